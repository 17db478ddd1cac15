"""Project tools: the kill matrix (make test-faults) and the bad-inputs page generator."""
