"""The lock of a run directory: one job at a time writes a ``--save`` directory.

Two jobs saving into one run directory overwrite each other's checkpoints and marker (a second job started
on the directory of a running one trained to the end while the first died in its next save). So the job that
writes a run directory first takes ``RUN/save.lock`` (``layout.LOCK_FILE``), a small JSON record::

    {"host": "node7", "pid": 4121, "job": "slurm:81234", "started": "2025-06-01T10:00:00+00:00", "ticks": 8812}

and holds an advisory ``fcntl`` lock on it where the file system has one, until the job ends (the record is
then removed; the kernel drops the advisory lock of a process that dies). Only rank 0 of a training job takes
it (:func:`acquire_collective`); every rank learns the outcome and raises the same one-line error.

Who may take a lock that is already there:

- the same job (``job``: the SLURM job id, torchrun's ``--rdzv-id``, the torchrun agent when it has none, the
  MPI job's namespace, else this process): a torchrun elastic restart or a requeued job takes over its own lock;
- anyone, when the holder was on this host and its process is gone (the pid is dead, or reused by a process
  that started later: ``ticks`` is the holder's start time in clock ticks since boot): a stale lock of a job
  killed with ``kill -9``, taken over with a warning;
- nobody else: a live holder on this host, a holder on another host (whether it still runs cannot be seen from
  here: the message says how to clear the lock), or an advisory lock another process still holds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

from megatron_mdm.checkpoint.layout import LOCK_FILE, CheckpointError

log = logging.getLogger(__name__)


class LockError(CheckpointError):
    """The run directory is being written by another job (or cannot be written at all)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str
    started: str
    ticks: Optional[int] = None

    def describe(self) -> str:
        return f"job {self.job} (pid {self.pid} on host {self.host}, started {self.started})"


def job_id(env: Optional[Mapping[str, str]] = None, host: Optional[str] = None) -> str:
    """The launcher's identity of this job, the same for every restart of it (see the module docstring)."""
    env = os.environ if env is None else env
    host = host or socket.gethostname()
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun:{run_id}"
    if run_id == "none":  # torchrun without --rdzv-id: its agent (our parent) restarts the workers
        return f"torchrun:{host}:{os.getppid()}"
    for key in ("PMIX_NAMESPACE", "OMPI_MCA_orte_hnp_uri", "PMI_JOBID"):
        if env.get(key):
            return f"mpi:{env[key]}"
    return f"process:{host}:{os.getpid()}"


def _start_ticks(pid: int) -> Optional[int]:
    """When process ``pid`` started (clock ticks since boot, Linux), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces
    except (IndexError, ValueError):
        return None


def _alive(holder: Holder) -> bool:
    """Whether the holder's process (on this host) still runs: its pid exists and started when it did."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    ticks = _start_ticks(holder.pid)
    return holder.ticks is None or ticks is None or ticks == holder.ticks


def this_holder(job: Optional[str] = None) -> Holder:
    pid = os.getpid()
    return Holder(host=socket.gethostname(), pid=pid, job=job or job_id(),
                  started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  ticks=_start_ticks(pid))


def _parse(text: str) -> Optional[Holder]:
    try:
        d = json.loads(text)
        return Holder(host=str(d["host"]), pid=int(d["pid"]), job=str(d["job"]), started=str(d["started"]),
                      ticks=None if d.get("ticks") is None else int(d["ticks"]))
    except (ValueError, KeyError, TypeError):
        return None


def read_holder(root: str | os.PathLike) -> Optional[Holder]:
    """The record of the lock of run directory ``root``, or None (no lock, or an unreadable one)."""
    try:
        return _parse((Path(root) / LOCK_FILE).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def directory_problem(root: str | os.PathLike) -> Optional[str]:
    """Why ``root`` cannot be written as a run directory (it or a parent is a file, a read-only file system, no
    permission), or None; it looks without writing anything."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        return f"{root} exists and is not a directory"
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"{root} is on a read-only file system"
    except (OSError, AttributeError):  # pragma: no cover - no statvfs here
        pass
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{root} is not writable (no permission on {probe})"
    return None


def _directory_problem(root: Path, e: OSError) -> str:
    if isinstance(e, (FileExistsError, NotADirectoryError)) or (root.exists() and not root.is_dir()):
        return f"{root} exists and is not a directory"
    if e.errno == errno.EROFS:
        return f"{root} is on a read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{root} is not writable ({e.strerror})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{root}: disk full ({e.strerror})"
    return f"{root}: {e.strerror or e}"


def _try_advisory_lock(fd: int) -> Optional[bool]:
    """True: locked; False: another process holds it; None: the file system has no advisory locks."""
    import fcntl

    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EINVAL: no locking here


class SaveLock:
    """The held lock of one run directory; :meth:`release` (or the end of the process) gives it back."""

    def __init__(self, root: Path, fd: int, holder: Holder) -> None:
        self.root, self._fd, self.holder = root, fd, holder

    @property
    def path(self) -> Path:
        return self.root / LOCK_FILE

    def release(self) -> None:
        """Remove the record (when it is still ours) and drop the advisory lock."""
        if self._fd is None:
            return
        try:
            if read_holder(self.root) == self.holder:
                self.path.unlink()
        except OSError as e:  # pragma: no cover - e.g. the directory was removed meanwhile
            log.warning("could not remove the lock %s: %s", self.path, e)
        finally:
            os.close(self._fd)
            self._fd = None


def acquire(root: str | os.PathLike, flag: str = "--save", job: Optional[str] = None) -> SaveLock:
    """Take the lock of run directory ``root`` (created if missing) for this process; LockError if it is taken.

    ``flag`` names the option in messages; ``job`` defaults to :func:`job_id`.
    """
    root = Path(root)
    me = this_holder(job)
    path = root / LOCK_FILE
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LockError(f"{flag}: {_directory_problem(root, e)}") from None
    try:
        locked = _try_advisory_lock(fd)
        holder = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace"))
        refusal = _refusal(root, flag, me, holder, locked)
        if refusal is not None:
            raise LockError(refusal)
        if holder is not None and holder.job != me.job and (holder.host, holder.pid) != (me.host, me.pid):
            log.warning("%s: took over the lock of %s: its process is no longer running", path, holder.describe())
        elif holder is not None and holder.pid != me.pid:
            log.info("%s: taking over the lock of an earlier start of this job (%s)", path, holder.describe())
        body = (json.dumps(asdict(me)) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, body, 0)
        os.fsync(fd)
    except LockError:
        os.close(fd)
        raise
    except OSError as e:
        os.close(fd)
        raise LockError(f"{flag}: cannot write the lock {path}: {_directory_problem(root, e)}") from None
    return SaveLock(root, fd, me)


def _refusal(root: Path, flag: str, me: Holder, holder: Optional[Holder], locked: Optional[bool]) -> Optional[str]:
    """Why this process may not take the lock, or None."""
    path = root / LOCK_FILE
    advice = "wait for it to end, or choose another " + flag
    if holder is not None and (holder.job == me.job or (holder.host, holder.pid) == (me.host, me.pid)):
        return None  # a restart of this job, or this very process
    if locked is False:
        who = holder.describe() if holder is not None else "another process"
        return (f"{flag}: {root} is in use by {who}: two jobs writing one run directory overwrite each "
                f"other's checkpoints; {advice}")
    if holder is None:
        return None
    if holder.host == me.host:
        if _alive(holder):
            return (f"{flag}: {root} is in use by {holder.describe()}: two jobs writing one run directory "
                    f"overwrite each other's checkpoints; {advice}")
        return None  # stale: its process is gone
    return (f"{flag}: {root} is locked by {holder.describe()}, another host: if that job is no longer running, "
            f"delete {path} and start again; otherwise {advice}")


def acquire_collective(root: Optional[str], flag: str = "--save") -> Optional[SaveLock]:
    """All ranks: rank 0 takes the lock of ``root``; every rank raises the same LockError when it cannot.

    Returns the lock on rank 0 (None elsewhere, and without ``root``).
    """
    import torch

    if root is None:
        return None
    held, status = None, [None]
    if torch.distributed.get_rank() == 0:
        try:
            held = acquire(root, flag)
        except LockError as e:
            status = [str(e)]
    torch.distributed.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise LockError(status[0])
    return held


@contextlib.contextmanager
def holding(root: str | os.PathLike, flag: str = "--output") -> Iterator[SaveLock]:
    """Hold the lock of ``root`` in this one process for the block (``mdm-convert from-hf``)."""
    held = acquire(root, flag)
    try:
        yield held
    finally:
        held.release()
