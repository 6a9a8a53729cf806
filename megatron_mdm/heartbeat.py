"""Naming the rank a failed collective waited for.

When one process of a job stops answering (SIGSTOP, a hang that holds the GIL, a lost node), the others
block in their next collective until ``--distributed-timeout-minutes`` and gloo then raises "Timed out
waiting 600000ms for recv operation to complete", or "Connection closed by peer" for a dead one: neither
names a rank. So every rank runs a daemon thread that adds 1 to its own counter in the job's rendezvous
store (the TCPStore at MASTER_ADDR:MASTER_PORT that ``init_process_group`` joined) every few seconds; a
stopped or dead process's counter stops. After such a failure, ``describe_peer_failure`` reads the counters
twice and names the ranks whose counter did not move.

Cost: one small store request per rank per interval (at most 2 s), and one thread. The store host is the
torchrun agent of the first node, or rank 0's own process under srun and mpirun: when that process is the
one that stopped, the store does not answer either, and the message says so.
"""

from __future__ import annotations

import datetime
import logging
import re
import socket
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

# gloo's words for a peer that stopped answering (timeout) or went away (its process died)
_PEER_FAILURE = re.compile(r"Timed out waiting \d+ms for (recv|send) operation|Connection closed by peer|"
                           r"Connection reset by peer|Broken pipe")


class Heartbeat:
    """This rank's counter in the rendezvous store, bumped every ``interval`` seconds by a daemon thread."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_minutes: float):
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.timeout_minutes = timeout_minutes
        self.interval = min(2.0, max(0.5, timeout_minutes * 60 / 6))
        self._prefix = "mdm_heartbeat/"  # a stale counter of an earlier attempt (shared torchrun store) stays still
        self._store = self._connect()
        self._store.add(self._key(rank), 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mdm-heartbeat", daemon=True)
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"{self._prefix}{rank}"

    def _connect(self):
        from torch.distributed import TCPStore

        return TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                        timeout=datetime.timedelta(seconds=max(10.0, 2 * self.interval)))

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._store.add(self._key(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return

    def stop(self) -> None:
        self._stop.set()

    def silent_ranks(self) -> Optional[list[int]]:
        """Ranks whose counter did not move over 2.5 intervals; None when the store does not answer.

        The reads run in a daemon thread with a deadline: a TCPStore client whose server process is
        stopped waits far past its own timeout (seen with torch 2.13)."""
        keys = [self._key(r) for r in range(self.world_size)]
        found: list = []

        def probe() -> None:
            try:
                found.append(changes())
            except Exception:  # noqa: BLE001 - refused or timed out: the store's host is down too
                pass

        def changes() -> list[int]:
            socket.create_connection((self.host, self.port), timeout=5).close()  # refused: the host is gone
            store = self._connect()  # its own connection: the thread's may be mid-request

            def read() -> list[int]:
                if store.check(keys):
                    return [int(v) for v in store.multi_get(keys)]
                return [int(store.add(k, 0)) for k in keys]  # a rank that never started counts 0

            before = read()
            time.sleep(2.5 * self.interval)
            after = read()
            return [r for r in range(self.world_size) if after[r] == before[r]]

        thread = threading.Thread(target=probe, name="mdm-heartbeat-probe", daemon=True)
        thread.start()
        thread.join(2.5 * self.interval + 15)
        return found[0] if found else None


_HEARTBEAT: Optional[Heartbeat] = None


def start(host: str, port: int, rank: int, world_size: int, timeout_minutes: float) -> None:
    """Start this process's heartbeat (once; diagnostics only: a store that cannot be reached is logged)."""
    global _HEARTBEAT
    if _HEARTBEAT is not None or world_size < 2:
        return
    try:
        _HEARTBEAT = Heartbeat(host, port, rank, world_size, timeout_minutes)
    except Exception as e:  # noqa: BLE001
        log.warning("no heartbeat in the rendezvous store %s:%s (%s): a timed-out collective will not name "
                    "the rank it waited for", host, port, e)


def stop() -> None:
    global _HEARTBEAT
    if _HEARTBEAT is not None:
        _HEARTBEAT.stop()
        _HEARTBEAT = None


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another rank timed out or went away (gloo's messages)."""
    return bool(_PEER_FAILURE.search(str(error)))


def describe_peer_failure(error: BaseException) -> str:
    """One line for a collective that failed because of another rank: which ranks stopped answering."""
    hb = _HEARTBEAT
    text = " ".join(str(error).split())
    what = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[.../unbound_buffer.cc:78]" source prefix
    if hb is None:
        return f"a collective operation failed: {what}"
    me = f"rank {hb.rank}"
    if "Timed out" in what:
        what = f"a collective operation timed out after --distributed-timeout-minutes {hb.timeout_minutes:g}"
    else:
        what = f"a collective operation lost its connection to another rank ({what})"
    silent = hb.silent_ranks()
    if silent is None:
        return (f"{me}: {what}; the rendezvous store at {hb.host}:{hb.port} does not answer either: the process "
                "that hosts it (rank 0 under srun and mpirun, the first node's torchrun agent) is stopped, hung "
                "or dead")
    silent = [r for r in silent if r != hb.rank]
    if not silent:
        return (f"{me}: {what}; every rank's heartbeat still moves, so no process is stopped: one is stuck "
                "elsewhere (another collective, I/O); see the other ranks' logs")
    return (f"{me}: {what}; rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped "
            f"answering (no heartbeat for {2.5 * hb.interval:.0f} s: the process is stopped, hung or dead, or "
            "its node is lost)")
