"""A free TCP port for a local rendezvous (``MASTER_PORT``, ``torchrun --master-port``).

The usual trick (bind port 0, read the port, close) hands out a port from the kernel's ephemeral
range. Between that and the rendezvous server's bind, which comes seconds later in a freshly spawned
process, the kernel may give the same port to any outgoing connection or port-0 listener on the
machine (gloo opens many), and the job dies with ``EADDRINUSE``. Ports below the ephemeral range are
never handed out by the kernel, so here a port is drawn at random from below it and checked free;
only another caller of this function could pick the same one, with odds of about one in ten thousand.

Standard library only: launchers and benchmark drivers import it without torch.
"""

from __future__ import annotations

import random
import socket

_FLOOR = 10000  # below this sit well-known services
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_range(path: str = _RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux); the IANA range where it cannot be read."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return 49152, 65535


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port free on ``host`` now, outside the ephemeral range where the machine allows it."""
    lo, hi = ephemeral_range()
    # the free band: below the ephemeral range, or above it where the range starts low
    band = (_FLOOR, lo - 1) if lo - 1 - _FLOOR >= 1000 else (hi + 1, 65535) if 65535 - hi >= 1000 else None
    if band is not None:
        rng = random.SystemRandom()  # not the global RNG: tests seed it, and concurrent callers must differ
        for _ in range(attempts):
            port = rng.randint(*band)
            if _bindable(port, host):
                return port
    with socket.socket() as s:  # no band, or all tried were taken: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]
