"""Helper processes that end with the training process, also when it is killed with SIGKILL.

megatron-core's checkpoint writer (``dist_checkpointing.strategies.filesystem_async``) collects its write
results through a queue served by a ``multiprocessing`` Manager process, spawned at the first save and kept
for the life of the trainer. When the trainer is SIGKILLed (kill -9, the OOM killer, a launcher ending a
failed job) that server lives on as an orphan: it leaks one process per killed rank and holds the task's
stdout and stderr open, so ``srun`` waits 60 s for them before it lets the job end, and a cluster without
cgroup process tracking never removes it. And a scheduler's SIGUSR1 or SIGTERM, which reaches every process of
the job step, killed it in the middle of the very save the signal asked for. ``writer_queue_dies_with_parent``
starts that Manager itself, before megatron-core would, with the kernel's parent-death signal set and the
stop signals ignored.

Standard library only at import time: the spawned Manager imports this module to run its initializer.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
import threading
from multiprocessing.managers import SyncManager

PR_SET_PDEATHSIG = 1

_MANAGER = None


def helper_init() -> None:
    """Initializer of a helper process: it ends when the thread that started it exits (the kernel sends SIGKILL;
    Linux), and ignores SIGTERM and SIGUSR1. Schedulers send those to every process of a job step, and not to
    all at once: a helper started by the save that a signal on another node began could get this node's copy
    a moment later and die mid-save. The trainer decides when its helpers end."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def writer_queue_dies_with_parent() -> None:
    """Give megatron-core's checkpoint writer a results queue whose Manager process ends with this one.

    Called from the main thread before a save (the parent-death signal follows the creating thread); a
    no-op when megatron-core has no such queue or already made its own."""
    global _MANAGER
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # pragma: no cover - another megatron-core layout
        return
    if (getattr(filesystem_async, "_results_queue", "absent") is not None
            or threading.current_thread() is not threading.main_thread()):
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=helper_init)
    filesystem_async._results_queue = manager.Queue()
    _MANAGER = manager  # the proxy keeps it too; held here so that it plainly lives as long as we do
