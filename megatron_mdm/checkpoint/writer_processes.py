"""The processes megatron-core starts to write checkpoints end with the training process that started them.

megatron-core's shard writers report through a queue served by a spawned ``multiprocessing`` Manager, started
on the first save of a process (synchronous saves too), and ``--async-save`` forks a writer process that forks
one more per shard. A rank killed with ``kill -9`` left the Manager and its resource tracker running (found 20
minutes later). Here:

- the Manager is ours, started with an initializer that makes the kernel kill it when its parent dies
  (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread polls the parent), and handed to megatron-core
  (``filesystem_async._results_queue``); the resource tracker then exits too (it ends when every process
  holding its pipe is gone);
- processes forked while a save is being started or written (:func:`tied_children`) get the same setting.

These processes ignore the stop signals (SIGTERM, SIGINT, ...) sent to the training process's whole group:
a scheduler's SIGTERM to the group used to kill the Manager and fail the very save it asked for.

Everything here is plain process plumbing; nothing changes what is written.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Iterator

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_managers: list = []  # kept alive for the life of the process
_state = {"tied": False, "forking": 0, "registered": False}


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")


def die_with_parent(parent: int) -> None:
    """In a child process: be killed when ``parent`` (the process that started it) dies; exit now if it has.

    The child also ignores the stop signals a scheduler or launcher sends to the whole process group: the
    training process answers them by finishing its save, which needs this child alive.
    """
    for name in STOP_SIGNALS:
        try:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        except (AttributeError, ValueError):  # pragma: no cover - not on this platform / not the main thread
            pass
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux: watch the parent instead

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the setting was made
        os._exit(1)


def install_results_queue() -> None:
    """Serve megatron-core's writer results queue from a Manager that dies with this process (once)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # pragma: no cover - another megatron-core layout
        return
    if getattr(fa, "_results_queue", False) is not None:  # already set, or not this mechanism
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    _managers.append(manager)
    fa._results_queue = manager.Queue()


def _before_fork() -> None:
    _state["forking"] = os.getpid()


def _after_fork_in_child() -> None:
    if _state["tied"]:
        die_with_parent(_state["forking"])


@contextlib.contextmanager
def tied_children() -> Iterator[None]:
    """Processes forked in this block (and, in them, their own forks) die with the process that forked them."""
    if not _state["registered"] and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _state["registered"] = True
    install_results_queue()
    previous, _state["tied"] = _state["tied"], True
    try:
        yield
    finally:
        _state["tied"] = previous
