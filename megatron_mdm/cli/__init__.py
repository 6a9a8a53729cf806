"""The command lines (``mdm-*``): one module each; ``hide_progress_bars`` serves their ``--no-progress``."""

from __future__ import annotations


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
