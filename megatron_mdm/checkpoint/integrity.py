"""Checksums of checkpoint files, written at save and verified at load and export; readable errors.

Every checkpoint directory carries ``checksums.json``: the size and sha256 of each of its files
(``*.distcp`` shards, ``.metadata``, ``common.pt``, ``metadata.json``, ``config.yaml``, the tokenizer
copy). At save, each rank hashes the shard files it wrote itself (``__<rank>_*.distcp``, in threads)
and rank 0 hashes the rest and writes the manifest before the directory is moved into place. At load
the files are spread over the ranks by size; ``mdm-convert to-hf`` checks them in its one process.
sha256 runs at ~600 MB/s per core on the 2-core development machine (see docs/BENCHMARKS.md),
faster than blake2b there (SHA-NI); ``--no-verify-checkpoint`` skips the hashing (sizes are still
checked), for speed with trusted storage.

Independent of the manifest, ``check_structure`` reads ``.metadata`` (which torch unpickles: never
load checkpoints from untrusted sources) and checks that every file it references exists and is long
enough, which catches truncated and missing shards in checkpoints written before checksums existed.

Errors are one line naming the file and the previous complete iteration to load instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

from megatron_mdm.checkpoint.layout import (
    CONFIG_FILE,
    OLD_TAG,
    CheckpointError,
    complete_iterations,
    iteration_dir,
)

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"
ALLOW_UNVERIFIED_FLAG = "--allow-unverified-checkpoint"
ALGORITHM = "sha256"
_CHUNK = 8 << 20
_ITER_NAME = re.compile(r"^iter_(\d{7,})")


@dataclasses.dataclass(frozen=True)
class _Settings:
    verify_hash: bool = True
    iteration_flag: str = "--ckpt-iteration"
    allow_unverified: bool = False
    allow_flag: Optional[str] = ALLOW_UNVERIFIED_FLAG


_settings: contextvars.ContextVar[_Settings] = contextvars.ContextVar(
    "mdm_ckpt_verify", default=_Settings())  # noqa: B039 - a frozen dataclass


@contextlib.contextmanager
def verification(verify: bool = True, iteration_flag: str = "--ckpt-iteration", allow_unverified: bool = False,
                 allow_flag: Optional[str] = ALLOW_UNVERIFIED_FLAG) -> Iterator[None]:
    """Within this block, ``verify_files`` hashes (or, with ``verify=False``, only sizes), a checkpoint without
    its manifest is refused unless ``allow_unverified``, and error messages name ``iteration_flag``
    (``mdm-convert to-hf`` says ``--iteration``) and ``allow_flag`` (None: the tool has no such flag)."""
    token = _settings.set(_Settings(verify, iteration_flag, allow_unverified, allow_flag))
    try:
        yield
    finally:
        _settings.reset(token)


@contextlib.contextmanager
def settings_changed(**changes) -> Iterator[None]:
    """Within this block, the current verification settings with ``changes`` (``verify_hash``,
    ``allow_unverified``, ...); the rest (the flags messages name) stay as the caller set them."""
    token = _settings.set(dataclasses.replace(_settings.get(), **changes))
    try:
        yield
    finally:
        _settings.reset(token)


# ---- hashing -------------------------------------------------------------------------------------


def hash_file(path: Path) -> dict:
    h = hashlib.new(ALGORITHM)
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
            size += len(block)
    return {"size": size, ALGORITHM: h.hexdigest()}


def hash_files(root: Path, names: list[str], threads: int = 4) -> dict[str, dict]:
    """{name: {size, sha256}} for files under ``root`` (hashlib releases the GIL: threads overlap)."""
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: hash_file(root / n), names)))


def all_files(ckpt_dir: Path) -> list[str]:
    """Relative paths of every regular file under ``ckpt_dir`` except the manifest, sorted."""
    out = []
    for dirpath, _, files in os.walk(ckpt_dir):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(ckpt_dir).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def rank_files(ckpt_dir: Path, rank: int) -> list[str]:
    """The shard files ``rank`` wrote (torch_dist names them ``__<rank>_<n>.distcp``)."""
    return sorted(p.name for p in ckpt_dir.glob(f"__{rank}_*.distcp"))


def write_manifest(ckpt_dir: Path, entries: dict[str, dict]) -> None:
    body = {"format": 1, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / MANIFEST)


def write_manifest_from(ckpt_dir: Path, per_rank: list[dict]) -> None:
    """Rank 0: the manifest from the hashes each rank took of its own files, plus every other file."""
    entries: dict[str, dict] = {}
    for part in per_rank:
        entries.update(part)
    entries.update(hash_files(ckpt_dir, [n for n in all_files(ckpt_dir) if n not in entries]))
    write_manifest(ckpt_dir, entries)


def read_manifest(ckpt_dir: Path) -> Optional[dict]:
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        if body.get("algorithm", ALGORITHM) != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"unsupported algorithm {body.get('algorithm')!r}")
        return files
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(damaged_message(ckpt_dir, MANIFEST, f"unreadable ({e})")) from None


# ---- verification --------------------------------------------------------------------------------


def _file_problem(ckpt_dir: Path, name: str, entry: dict, verify_hash: bool) -> Optional[str]:
    path = ckpt_dir / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"missing (listed in {MANIFEST})"
    if size != entry.get("size"):
        return f"{size} bytes, {entry.get('size')} expected (truncated or overwritten)"
    if verify_hash and hash_file(path)[ALGORITHM] != entry.get(ALGORITHM):
        return (f"{ALGORITHM} checksum mismatch (the file changed after it was saved; "
                "--no-verify-checkpoint skips this check)")
    return None


def check_structure(ckpt_dir: Path) -> Optional[tuple[str, str]]:
    """(file, problem) when ``.metadata`` is unreadable or a shard it references is missing or short."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in (".metadata", "metadata.json"):
        if not (ckpt_dir / name).is_file():
            return name, "missing"
    try:
        md = FileSystemReader(str(ckpt_dir)).read_metadata()
    except BaseException as e:  # noqa: BLE001 - unpickling a damaged file raises anything
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return ".metadata", f"unreadable ({type(e).__name__}: {first_line(e)})"
    needed: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel in sorted(needed):
        try:
            size = (ckpt_dir / rel).stat().st_size
        except FileNotFoundError:
            return rel, "missing (referenced by .metadata)"
        if size < needed[rel]:
            return rel, f"{size} bytes, at least {needed[rel]} expected (truncated)"
    return None


def _assign(files: dict[str, dict], world: int) -> list[list[str]]:
    """Split files over ranks by size (largest first to the least loaded rank): the same on every rank."""
    loads = [0] * world
    parts: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(files, key=lambda n: (-int(files[n].get("size") or 0), n)):
        r = loads.index(min(loads))
        parts[r].append(name)
        loads[r] += int(files[name].get("size") or 0)
    return parts


def find_problem(ckpt_dir: Path, rank: int = 0, world: int = 1, verify_hash: Optional[bool] = None
                 ) -> Optional[tuple[str, str]]:
    """This rank's share of the checks: (file, problem) or None. Rank 0 also checks the structure."""
    verify_hash = _settings.get().verify_hash if verify_hash is None else verify_hash
    ckpt_dir = Path(ckpt_dir)
    files = read_manifest(ckpt_dir)
    if files is None:
        refused = _missing_manifest(ckpt_dir, warn=rank == 0)
        if refused is not None:
            return MANIFEST, refused
    else:
        mine = _assign(files, world)[rank]
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(mine) or 1))) as pool:
            problems = list(pool.map(lambda n: _file_problem(ckpt_dir, n, files[n], verify_hash), mine))
        for name, problem in sorted(zip(mine, problems)):
            if problem is not None:
                return name, problem
    return check_structure(ckpt_dir) if rank == 0 else None


def saved_before_checksums(ckpt_dir: Path) -> bool:
    """Whether the checkpoint was written by a version without checksums: its ``config.yaml`` (every version
    writes one; YAML, read safely) lacks ``checkpoint.verify_checkpoint``, which arrived with them."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(ckpt_dir) / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    section = cfg.get("checkpoint") if isinstance(cfg, dict) else None
    return isinstance(section, dict) and "verify_checkpoint" not in section


def _missing_manifest(ckpt_dir: Path, warn: bool) -> Optional[str]:
    """None when a checkpoint without a manifest may be read (saved before checksums, or allowed by the user,
    with a warning); else the problem, naming the flag that allows it."""
    settings = _settings.get()
    if saved_before_checksums(ckpt_dir):
        if warn:
            log.warning("%s has no %s (saved before checksums existed): its files are checked for "
                        "presence and size only", ckpt_dir, MANIFEST)
        return None
    if settings.allow_unverified:
        if warn:
            log.warning("%s has no %s: its files cannot be verified; reading it anyway (%s)", ckpt_dir, MANIFEST,
                        settings.allow_flag)
        return None
    how = f"restore it, or pass {settings.allow_flag} to read the checkpoint unverified" if settings.allow_flag \
        else "restore it"
    return (f"missing (this version writes one into every checkpoint: deleted, or not copied with the other "
            f"files?), so its files cannot be verified: {how}")


def verify_entry(ckpt_dir: str | os.PathLike, name: str) -> None:
    """Check one file of a checkpoint against its manifest before it is read (a ``config.yaml`` before its
    values are trusted); CheckpointError naming the file when it is damaged or cannot be verified."""
    ckpt_dir = Path(ckpt_dir)
    files = read_manifest(ckpt_dir)
    if files is None:
        problem = _missing_manifest(ckpt_dir, warn=False)
        found = (MANIFEST, problem) if problem is not None else None
    elif name not in files:
        found = (name, f"not listed in {MANIFEST} (added after the save?)")
    else:
        problem = _file_problem(ckpt_dir, name, files[name], _settings.get().verify_hash)
        found = (name, problem) if problem is not None else None
    if found is not None:
        raise CheckpointError(damaged_message(ckpt_dir, *found))


def verify_files(ckpt_dir: str | os.PathLike) -> None:
    """Check one checkpoint directory in this process alone; CheckpointError naming the bad file."""
    ckpt_dir = Path(ckpt_dir)
    problem = find_problem(ckpt_dir)
    if problem is not None:
        raise CheckpointError(damaged_message(ckpt_dir, *problem))


def verify_collective(ckpt_dir: Path, verify_hash: bool = True) -> None:
    """All ranks: each checks its share of the files; the same CheckpointError is raised everywhere."""
    import torch

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        mine = find_problem(ckpt_dir, rank, world, verify_hash)
    except CheckpointError as e:  # an unreadable manifest: the same on every rank
        mine = ("", str(e))
    found: list = [None] * world
    torch.distributed.all_gather_object(found, mine)
    problems = sorted(p for p in found if p is not None)
    if problems:
        name, problem = problems[0]
        raise CheckpointError(problem if not name else damaged_message(ckpt_dir, name, problem))


# ---- messages ------------------------------------------------------------------------------------


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def first_failure(e: BaseException) -> BaseException:
    """The underlying error: a torch CheckpointException's first rank failure, else ``e`` itself."""
    failures = getattr(e, "failures", None)  # {rank: (exc, trace)}
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def failure_line(e: BaseException) -> str:
    """The first line of the underlying error (a torch CheckpointException's first rank failure)."""
    return first_line(first_failure(e))


def previous_complete(ckpt_dir: Path) -> Optional[int]:
    """The newest complete iteration before ``ckpt_dir``'s in its run directory whose files pass
    the size checks, or None."""
    m = _ITER_NAME.match(ckpt_dir.name)
    if m is None:
        return None
    this = int(m.group(1))
    root = ckpt_dir.parent
    for it in reversed([i for i in complete_iterations(root) if i < this]):
        final = iteration_dir(root, it)
        for cand in [final] + sorted(root.glob(f"{final.name}{OLD_TAG}*")):
            if not cand.is_dir():
                continue
            try:
                if find_problem(cand, verify_hash=False) is None:
                    return it
            except CheckpointError:
                continue
    return None


def damaged_message(ckpt_dir: Path, name: str, problem: str) -> str:
    """``DIR/FILE: problem; checkpoint iteration N is damaged. Load the previous complete ...``"""
    ckpt_dir = Path(ckpt_dir)
    m = _ITER_NAME.match(ckpt_dir.name)
    what = f"checkpoint iteration {int(m.group(1))}" if m else "this checkpoint"
    prev = previous_complete(ckpt_dir)
    flag = _settings.get().iteration_flag
    if prev is not None:
        advice = f"load the previous complete checkpoint with {flag} {prev}"
    else:
        advice = f"no earlier complete checkpoint in {ckpt_dir.parent}"
    return f"{ckpt_dir / name}: {problem}; {what} is damaged: {advice}"


def save_error_reason(exc: BaseException, root: Optional[Path] = None) -> str:
    """One line for a failed save: 'disk full' for ENOSPC anywhere in the chain, or when the file system
    of ``root`` has less than min(256 MB, 1% of its size) free (megatron-core 0.19's shard writer drops
    the error number); else the first error."""
    seen = []
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        code = e.errno if isinstance(e, OSError) else None
        if code is None:  # pickled across processes (the shard writers): only the text is left
            m = re.search(r"\[Errno (\d+)\]|\(os error (\d+)\)", str(e))  # Python's, Rust's (safetensors)
            code = int(m.group(1) or m.group(2)) if m else None
        if code in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full ({os.strerror(code)})"
        failures = getattr(e, "failures", None)  # torch CheckpointException: {rank: (exc, trace)}
        if isinstance(failures, dict):
            stack.extend(v[0] if isinstance(v, tuple) else v for v in failures.values())
        stack.extend([e.__cause__, e.__context__])
    if root is not None:
        try:
            usage = shutil.disk_usage(root)
        except OSError:
            usage = None
        if usage is not None and usage.free < min(256 << 20, usage.total // 100):
            return f"disk full ({usage.free >> 20} MB free): {failure_line(exc)}"
    exc = first_failure(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"
