"""Shared by the evaluation tests: a pickle payload that must never run, and the one-line error check."""
import os

import pytest


class Payload:
    """Unpickling this creates `marker`: a file that contains one must be refused without being run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="session")
def payload():
    """payload(marker): an object whose unpickling would create the file `marker`."""
    return Payload


@pytest.fixture(scope="session")
def one_line():
    """one_line(excinfo) -> message: the raised error's text, asserted to be one line."""
    return _one_line
