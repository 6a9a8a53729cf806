"""The files of a run directory (``--save``): the one place that names them, and how saves replace them.

::

    RUN/config.yaml                          the resolved config of the latest start (``CONFIG_FILE``)
    RUN/metrics.jsonl                        one JSON record per logged step / evaluation (``METRICS_FILE``)
    RUN/tensorboard/                         TensorBoard event files (``TENSORBOARD_DIR``): the series against
                                             iterations; its by_tokens/ the same against tokens
    RUN/wandb/                               Weights & Biases files and the run's id (``WANDB_DIR``), with --wandb-project
    RUN/latest_checkpointed_iteration.txt    the marker: the newest complete checkpoint (``TRACKER``)
    RUN/iter_0000040/                        one checkpoint (``iteration_dir``), with its own config.yaml
    RUN/save.lock                            the job writing the run (``LOCK_FILE``, ``checkpoint.lock``)
    RUN/mdm_import.json                      a run written by ``mdm-convert from-hf`` (``IMPORT_FILE``)

A save never removes or overwrites the checkpoint the marker names::

    RUN/iter_0000040.tmp-<nonce>/   1. every rank writes here; rank 0 adds config, tokenizer, checksums
    RUN/iter_0000040/               2. renamed into place once everything is written (one rename)
    RUN/latest_checkpointed_iteration.txt   3. the marker moves (atomic replace), then older ones are pruned

A save of the iteration the marker already names (a run redone from an earlier checkpoint into the
same directory) first sets the old directory aside as ``iter_0000040.old-<nonce>`` and renames the new
one into place; a job killed between those two renames resumes from the set-aside directory
(``resolve_checkpoint`` falls back to it). Leftover ``.tmp-``/``.old-`` directories of killed saves are
removed by the next save, except a set-aside directory the marker still depends on.

Only rank 0 changes the run directory; every function here is plain file-system work, no collectives.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

from megatron_mdm.errors import UserError

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
COMPLETE_FILE = "metadata.json"  # written last by dist_checkpointing.save
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DROPPED_METRICS_FILE = "metrics.dropped.jsonl"  # records of steps a later run redid
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_TOKENS_DIR = "by_tokens"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "run_id.txt"
LOCK_FILE = "save.lock"
IMPORT_FILE = "mdm_import.json"
RUN_FILES = (TRACKER, CONFIG_FILE, METRICS_FILE, DROPPED_METRICS_FILE, TENSORBOARD_DIR, WANDB_DIR, LOCK_FILE,
             IMPORT_FILE)
"""The names a run directory owns besides its ``iter_*`` checkpoints."""
_ITER = re.compile(r"^iter_(\d{7,})$")
_AUX = re.compile(r"^iter_(\d{7,})(\.tmp-|\.old-)[0-9a-f]+$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def config_file(directory: str | os.PathLike) -> Path:
    """The resolved config of a run directory or of one of its checkpoints."""
    return Path(directory) / CONFIG_FILE


def metrics_file(root: str | os.PathLike) -> Path:
    return Path(root) / METRICS_FILE


def tensorboard_dir(root: str | os.PathLike) -> Path:
    return Path(root) / TENSORBOARD_DIR


def tensorboard_tokens_dir(tb_dir: str | os.PathLike) -> Path:
    """Where the series against tokens go, inside a TensorBoard directory (a run of its own: its steps are tokens)."""
    return Path(tb_dir) / TENSORBOARD_TOKENS_DIR


def wandb_dir(root: str | os.PathLike) -> Path:
    return Path(root) / WANDB_DIR


def wandb_id_file(root: str | os.PathLike) -> Path:
    """The W&B run id of a run directory: a resume logs to the same W&B run."""
    return wandb_dir(root) / WANDB_ID_FILE


def latest_checkpoint_dir(load: str | os.PathLike) -> Optional[Path]:
    """The directory of the newest checkpoint ``load`` names without checking it: ``load`` itself when it is a
    checkpoint directory, else the iteration directory the marker names; None without a readable marker."""
    root = Path(load)
    if is_complete(root):
        return root
    try:
        iteration = read_latest_iteration(root)
    except CheckpointError:
        return None
    return None if iteration is None else iteration_dir(root, iteration)


def new_nonce() -> str:
    return uuid.uuid4().hex[:12]


def temp_dir(root: str | os.PathLike, iteration: int, nonce: str) -> Path:
    """Where a save of ``iteration`` writes before it is complete."""
    return Path(root) / f"iter_{iteration:07d}{TMP_TAG}{nonce}"


def read_latest_iteration(root: str | os.PathLike) -> Optional[int]:
    """The iteration recorded in the marker file, or None when there is no complete checkpoint."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not re.fullmatch(r"[0-9]+", text):  # str.isdigit() also accepts digits int() refuses, e.g. '²'
        raise CheckpointError(f"{path}: expected an iteration number (ASCII digits), found {text[:40]!r}; "
                              "the marker is damaged: write the newest complete iteration into it, or load one "
                              "with --ckpt-iteration")
    return int(text)


def owned_by_run(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` is, or lies inside, one of the files run directory ``root`` owns (a checkpoint, the
    marker, the config, the metrics, TensorBoard files, the lock). Both are resolved (symbolic links)."""
    root, path = Path(root).resolve(), Path(path).resolve()
    if path == root or root not in path.parents:
        return path == root
    first = path.relative_to(root).parts[0]
    return first in RUN_FILES or first.startswith("iter_")


def holds_run(path: str | os.PathLike) -> bool:
    """Whether directory ``path`` holds a run: a marker, a lock or a checkpoint (``iter_*``) at its top."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (path / TRACKER).exists() or (path / LOCK_FILE).exists() or any(path.glob("iter_*"))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_FILE).is_file()


def _set_aside(root: Path, iteration: int) -> Optional[Path]:
    """The complete set-aside copy of ``iteration`` left by a save killed inside its swap, if any."""
    found = sorted(p for p in root.glob(f"iter_{iteration:07d}{OLD_TAG}*") if is_complete(p))
    return found[-1] if found else None


def checkpoint_path(root: str | os.PathLike, iteration: int) -> Optional[Path]:
    """The complete directory holding ``iteration`` (the set-aside copy if the swap was cut), or None."""
    root = Path(root)
    path = iteration_dir(root, iteration)
    if is_complete(path):
        return path
    if not path.exists():
        return _set_aside(root, iteration)
    return None


def complete_iterations(root: str | os.PathLike) -> list[int]:
    """Iterations under ``root`` with a complete directory, ascending."""
    root = Path(root)
    its = set()
    for p in root.glob("iter_*"):
        m = _ITER.match(p.name) or _AUX.match(p.name)
        if m and (m.re is _ITER or m.group(2) == OLD_TAG) and is_complete(p):
            its.add(int(m.group(1)))
    return sorted(its)


def resolve_checkpoint(root: str | os.PathLike, iteration: Optional[int] = None) -> Path:
    """The directory of the requested (or latest) checkpoint under ``root``; CheckpointError if none.

    ``root`` may also be an ``iter_*`` directory itself.
    """
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"--load: {root} does not exist")
    if is_complete(root) and iteration is None:
        return root
    if iteration is None:
        iteration = read_latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load: {root} has no complete checkpoint ({TRACKER} is missing)")
    path = checkpoint_path(root, iteration)
    if path is None:
        available = complete_iterations(root)
        hint = (f"; pass --ckpt-iteration {available[-1]} to load the newest complete one"
                if available else "")
        raise CheckpointError(f"--load: no complete checkpoint for iteration {iteration} in {root}; "
                              f"complete iterations: {available}{hint}")
    if path.name != iteration_dir(root, iteration).name:
        log.warning("%s is missing (a save was killed while replacing it): loading its previous copy %s",
                    iteration_dir(root, iteration).name, path.name)
    return path


def nothing_to_resume(load: str | os.PathLike, save: Optional[str | os.PathLike]) -> bool:
    """``--load`` is the run's own ``--save`` directory and holds no checkpoint yet (no marker, no complete
    iteration): the first start of a job whose every (re)start passes ``--load D --save D``."""
    if save is None or Path(load).resolve() != Path(save).resolve():
        return False
    return read_latest_iteration(load) is None and not complete_iterations(load)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a file system that does not open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_tracker(root: Path, iteration: int) -> None:
    tmp = root / (TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER)  # atomic: readers see the old or the new marker
    fsync_dir(root)


def clean_leftovers(root: str | os.PathLike) -> list[str]:
    """Remove temporary directories of killed saves (never a copy the marker still depends on)."""
    root = Path(root)
    latest = read_latest_iteration(root)
    keep = checkpoint_path(root, latest) if latest is not None else None
    removed = []
    for p in sorted(root.glob("iter_*")):
        if _AUX.match(p.name) and p != keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if removed:
        log.info("removed %d leftover director%s of interrupted saves: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed


def commit(root: str | os.PathLike, tmp: Path, iteration: int, keep_last: int = 0) -> Path:
    """Move a completely written ``tmp`` into place as ``iteration``, move the marker, then prune."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    aside = None
    if final.exists() or final.is_symlink():
        aside = final.with_name(final.name + OLD_TAG + tmp.name.rsplit("-", 1)[-1])
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_dir(root)
    write_tracker(root, iteration)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if keep_last > 0:
        prune(root, keep_last)
    return final


def prune(root: str | os.PathLike, keep_last: int) -> list[int]:
    """Delete complete checkpoints older than the last ``keep_last`` up to the marker's; never the marker's."""
    root = Path(root)
    latest = read_latest_iteration(root)
    if latest is None:
        return []
    done = [it for it in complete_iterations(root) if it <= latest]
    removed = []
    for it in done[:-keep_last]:
        if it == latest:  # cannot happen with keep_last >= 1; stated for the reader
            continue
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)
        removed.append(it)
    return removed
