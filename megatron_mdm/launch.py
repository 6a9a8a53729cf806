"""How a training job is started: its command line, its environment on this machine, a free rendezvous port.

``pretrain_command(args, nproc)`` is the one place that spells the command that trains: the importable entry
``python -m megatron_mdm.cli.pretrain`` (what ``pretrain/pretrain_mdm.py`` calls), as one process or under
torchrun (``python -m torch.distributed.run``) with ``nproc`` workers. The sweep launcher, the examples, the
benchmarks and the tests build their jobs with it; ``local_env`` gives a job on this machine its environment.

A free TCP port for a local rendezvous (``MASTER_PORT``, ``torchrun --master-port``): the usual trick (bind
port 0, read the port, close) hands out a port from the kernel's ephemeral range. Between that and the
rendezvous server's bind, which comes seconds later in a freshly spawned process, the kernel may give the same
port to any outgoing connection or port-0 listener on the machine (gloo opens many), and the job dies with
``EADDRINUSE``. Ports below the ephemeral range are never handed out by the kernel, so here a port is drawn at
random from below it and checked free; only another caller of this function could pick the same one, with odds
of about one in ten thousand.

Standard library only: launchers and benchmark drivers import it without torch.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Mapping, Sequence

PRETRAIN_MODULE = "megatron_mdm.cli.pretrain"
"""The training entry, run with ``python -m`` (or torchrun's ``-m``)."""

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


def pretrain_command(args: Sequence[str] = (), nproc: int = 1, *, torchrun: bool | None = None,
                     python: str | None = None, master_port: int | None = None,
                     launcher_args: Sequence[str] = ()) -> list[str]:
    """The command line that trains with ``args`` (``mdm-pretrain`` flags) on this machine.

    Args:
        args: the training flags.
        nproc: worker processes; more than one runs under torchrun.
        torchrun: force torchrun on (also for one worker) or off (default: ``nproc > 1``).
        python: the interpreter (default: this one).
        master_port: torchrun's rendezvous port (default: a free one).
        launcher_args: more torchrun flags (``--max-restarts 2``, ``--nnodes 2``, ...), before the module.
    Returns:
        ``[python, -m, megatron_mdm.cli.pretrain, *args]`` or its torchrun form. A single process without
        torchrun needs ``local_env`` (its rendezvous address and port).
    """
    py = python or sys.executable
    if not (nproc > 1 if torchrun is None else torchrun):
        return [py, "-m", PRETRAIN_MODULE, *args]
    return [py, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(master_port or free_port()), *launcher_args, "-m", PRETRAIN_MODULE, *args]


def local_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a job on this machine: ``base`` (default ``os.environ``) without the variables of an
    enclosing launcher (``RANK``, ``SLURM_*``, ``OMPI_*``, ...), with ``OMP_NUM_THREADS`` (1 unless set) and a
    local rendezvous (``MASTER_ADDR``, a free ``MASTER_PORT``) for a single process; ``extra`` wins."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "SLURM_",
                                "OMPI_", "PMI", "TORCHELASTIC_"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    env.update(extra)
    return env
