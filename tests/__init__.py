"""The test suite. A regular package, so that processes spawned by tests import these modules rather than the
`tests` package torch-fidelity installs into site-packages."""
