"""The console scripts (``mdm-*``), one module each. Shared here: the argument parser every one of them uses
(one-line errors, plain-text help) and ``hide_progress_bars`` for their ``--no-progress``.

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


def hide_progress_bars() -> None:
    """``--no-progress``: no progress bar at all in this process.

    Our bars take a ``progress`` flag; the libraries' do not all: transformers ("Loading weights") and datasets
    ("Generating split") have a switch, and lm-eval's ("building contexts") is a plain tqdm, so every tqdm bar
    created from now on is disabled (tqdm's documented idiom of patching its ``__init__``).
    """
    import os

    from tqdm import std

    os.environ["TQDM_DISABLE"] = "1"  # processes started from this one
    if not getattr(std.tqdm.__init__, "_mdm_disabled", False):
        init = std.tqdm.__init__

        def disabled(self, *args, **kwargs):
            kwargs["disable"] = True
            init(self, *args, **kwargs)

        disabled._mdm_disabled = True  # type: ignore[attr-defined]
        std.tqdm.__init__ = disabled
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
