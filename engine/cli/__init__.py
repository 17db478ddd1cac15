"""Layer 6: the command-line entry points, thin: parse, build from config, call, report.

Every command's ``main(argv) -> int`` is wrapped by :func:`entry_point`, the one error handler: a
:class:`engine.errors.UserError` is printed as one line ``error: ...`` on stderr and the exit code is 2
(a stop on SIGTERM/SIGINT: ``stopped: ...`` and 128 + the signal); Ctrl-C outside training is one line and
130; anything else is a bug and keeps its traceback. setup.py installs each command as a console script
(``cmt-train``, ``cmt-sample``, ...); ``python -m engine.cli.<command>`` runs the same code.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Optional

from engine.errors import UserError


class CommandParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as the one line every other bad input gets (exit code 2)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def entry_point(main: Callable[[Optional[list]], Optional[int]]) -> Callable[[Optional[list]], int]:
    """``main`` with the one error path of every command: a UserError is one line and exit code 2."""
    @functools.wraps(main)
    def run(argv: Optional[list] = None) -> int:
        try:
            return main(argv) or 0
        except UserError as error:
            print(f"{error.prefix}: {error}", file=sys.stderr, flush=True)
            return error.exit_code
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            return 130
    return run
