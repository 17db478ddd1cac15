"""Layer 6: the command-line entry points, thin: parse, build from config, call, report.

Every command's ``main(argv) -> int`` is wrapped by :func:`entry_point`, the one error handler: a
:class:`engine.errors.UserError` is printed as one line ``error: ...`` on stderr and the exit code is 2;
anything else is a bug and keeps its traceback. setup.py installs each command as a console script
(``cmt-train``, ``cmt-sample``, ...); ``python -m engine.cli.<command>`` runs the same code.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

from engine.errors import UserError


def entry_point(main: Callable[[Optional[list]], Optional[int]]) -> Callable[[Optional[list]], int]:
    """``main`` with the one error path of every command: a UserError is one line and exit code 2."""
    @functools.wraps(main)
    def run(argv: Optional[list] = None) -> int:
        try:
            return main(argv) or 0
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 2
    return run
