"""What differs between the megatron-core releases we support (0.16.1 on Python 3.11, 0.19.x on GPUs).

One place for every version difference, decided by what the installed megatron-core *has*
(``inspect.signature(...).parameters``, attributes), never by comparing version strings. Call sites
elsewhere stay one line. What was found when CI first ran on both releases is in
docs/KNOWN_ISSUES.md ("megatron-core 0.16 vs 0.19").

* ``dist_save_kwargs``: from 0.17, ``dist_checkpointing.save`` defaults to ``async_strategy="nvrx"``,
  which needs ``nvidia-resiliency-ext``; we always ask for Megatron's own ("mcore") strategy.
* ``mcore_version``: the release, without the ``+<git hash>`` that ``package_info.__version__`` gains
  when the package sits inside any git work tree (a venv inside a checkout records *our* commit).
* ``load_common_state`` / ``check_checkpoint_version``: a checkpoint written by another megatron-core
  minor release. From 0.17 the common state is a ``common_state`` sharded object inside the torch_dist
  files instead of ``common.pt``: 0.16 checkpoints load on 0.19 (with a warning: keep one version per
  run lineage), but 0.19 checkpoints do not load on 0.16 (an AttributeError deep inside
  ``load_common_state_dict``), so that direction is refused with one clear line.

Everything here imports megatron-core lazily, so that this module is cheap to import.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Any, Optional

from megatron_mdm.checkpoint.layout import CheckpointError

log = logging.getLogger(__name__)

#: setting it to 1 turns the refusal of a checkpoint of a newer megatron-core into a warning
ALLOW_MISMATCH_ENV = "MDM_ALLOW_MCORE_MISMATCH"


def has_param(fn: Any, name: str) -> bool:
    """True when callable ``fn`` accepts a parameter called ``name`` (a feature test, not a version test)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def dist_save_kwargs() -> dict:
    """Extra keyword arguments for ``dist_checkpointing.save`` (sync or async)."""
    from megatron.core import dist_checkpointing

    return {"async_strategy": "mcore"} if has_param(dist_checkpointing.save, "async_strategy") else {}


def mcore_version() -> str:
    """The installed megatron-core release, e.g. ``"0.19.2"`` ("unknown" if it cannot be read)."""
    try:
        from megatron.core import package_info
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return "unknown"
    short = getattr(package_info, "__shortversion__", None)
    if short:
        return str(short)
    return str(getattr(package_info, "__version__", "unknown")).split("+")[0]


def minor_release(version: Optional[str]) -> Optional[tuple[int, int]]:
    """``"0.19.2+abc"`` -> ``(0, 19)``; None for a missing or unreadable version."""
    if not version:
        return None
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def checkpoint_version_problem(saved: Optional[str], running: Optional[str] = None) -> tuple[str, str]:
    """Judge a checkpoint's megatron-core version against the running one.

    Returns:
        ``(level, message)`` with level ``"ok"`` (same minor release or unknown), ``"warn"`` (an older
        release: it loads, but the lineage now mixes versions) or ``"error"`` (a newer release: its
        format is not readable by this one).
    """
    running = running or mcore_version()
    have, want = minor_release(saved), minor_release(running)
    if have is None or want is None or have == want:
        return "ok", ""
    if have < want:
        return "warn", (f"written by megatron-core {saved}, loaded with {running}: older checkpoints load, "
                        f"but checkpoints this run writes will not load on {have[0]}.{have[1]}; keep one "
                        "megatron-core version per run lineage")
    return "error", (f"written by megatron-core {saved}, but this is megatron-core {running}: a newer "
                     "release's checkpoint format is not readable by an older one. Load it with megatron-core "
                     f">= {have[0]}.{have[1]} (for CPU tests: .venv-mcore019, examples/setup_env_mcore019.sh), "
                     f"or set {ALLOW_MISMATCH_ENV}=1 to try anyway")


def load_common_state(path: Any) -> dict:
    """``dist_checkpointing.load_common_state_dict`` of a checkpoint directory, with the version check.

    Raises:
        CheckpointError: the checkpoint's common state is in a format this megatron-core cannot read
        (a newer release's), or its recorded megatron-core release is newer (see
        ``check_checkpoint_version``).
    """
    from pathlib import Path

    from megatron.core import dist_checkpointing

    path = Path(path)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the known format mismatch
        if (path / ".metadata").is_file() and not (path / "common.pt").exists():
            raise CheckpointError(
                f"{path}: this megatron-core ({mcore_version()}) cannot read the checkpoint's common state "
                f"({type(e).__name__}); it has no common.pt, so it was written by megatron-core >= 0.17, whose "
                "checkpoints older releases cannot load. Load it with the megatron-core that wrote it (for CPU "
                "tests: .venv-mcore019, examples/setup_env_mcore019.sh)") from None
        raise
    if isinstance(common.get("meta"), dict):
        check_checkpoint_version(common["meta"], path)
    return common


def check_checkpoint_version(meta: dict, path: Any) -> None:
    """Warn about (older) or refuse (newer) a checkpoint of another megatron-core minor release.

    Raises:
        CheckpointError: the checkpoint comes from a newer minor release (unless
        ``MDM_ALLOW_MCORE_MISMATCH=1``).
    """
    level, message = checkpoint_version_problem(meta.get("megatron_core_version"))
    if level == "ok":
        return
    if level == "error" and os.environ.get(ALLOW_MISMATCH_ENV, "0") != "1":
        raise CheckpointError(f"{path}: {message}")
    log.warning("%s: %s", path, message)
