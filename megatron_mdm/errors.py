"""The one user-error base class, and how every command line reports it.

An error the user can act on (a flag, a path, a file or one line of it) is a :class:`UserError`; each part of
the package has its own subclass (``ConfigError``, ``CheckpointError``, ``DataError``, ``ConversionError``,
...), whose message names the flag, file or line. Every command line catches ``UserError`` and prints it as
one line on stderr with exit status 2 (:func:`report`); anything else is a bug and keeps its traceback.

This module imports nothing, so every layer (``config``, ``data``, ``checkpoint``, ...) can use it.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2
"""The exit status of a command line stopped by a ``UserError`` (argparse's own, for a bad flag)."""


class UserError(Exception):
    """Something the user can fix: a flag, a path, a file's content. The message says which and how."""


def one_line(message: object) -> str:
    """``message`` on one line (a multi-line message joined by spaces: the log keeps the details)."""
    return " ".join(str(message).split("\n"))


def report(prog: str, message: object) -> int:
    """Print ``prog: message`` as one line on stderr; return :data:`EXIT_USER_ERROR`."""
    print(f"{prog}: {one_line(message)}", file=sys.stderr)
    return EXIT_USER_ERROR
