"""The console scripts. Shared here: the argument parser every one of them uses (one-line errors, plain-text help).

Importing this package imports only the standard library (``--help`` of every script stays fast).
"""

from __future__ import annotations

import argparse
import re
import sys


def plain(text: str | None) -> str | None:
    """A docstring as plain text for ``--help``: reST literals (````x````) lose their backquotes."""
    return None if text is None else re.sub(r"``([^`]+)``", r"\1", text)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``prog: error: ...``, exit 2) and whose
    description and epilog are shown as written, in plain text (no reST quotes); no abbreviated flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        for key in ("description", "epilog"):
            kwargs[key] = plain(kwargs.get(key))
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
