"""How a training job is started: its command line, its environment on this machine, a free rendezvous port.

``pretrain_command(args, nproc)`` is the one place that spells the command that trains: the importable entry
``python -m megatron_mdm.cli.pretrain`` (``mdm-pretrain``; what ``pretrain/pretrain_mdm.py`` calls), as one
process or as the launcher of ``nproc`` workers (``--nproc-per-node``: it checks the configuration, then starts
them through torch.distributed.run, in process, and reports a worker's error as one line). The sweep launcher,
the examples, the benchmarks and the tests build their jobs with it; ``local_env`` gives a job on this machine
its environment.

A free TCP port for a local rendezvous (``MASTER_PORT``, ``torchrun --master-port``): the usual trick (bind
port 0, read the port, close) hands out a port from the kernel's ephemeral range. Between that and the
rendezvous server's bind, which comes seconds later in a freshly spawned process, the kernel may give the same
port to any outgoing connection or port-0 listener on the machine (gloo opens many), and the job dies with
``EADDRINUSE``. Ports below the ephemeral range are never handed out by the kernel, so here a port is drawn at
random from below it and checked free; only another caller of this function could pick the same one, with odds
of about one in ten thousand.

Standard library only (``run_workers`` imports torch when it starts the workers): launchers and benchmark
drivers import it without torch.
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
        ``[python, -m, megatron_mdm.cli.pretrain, *args]`` or its launcher form (``--nproc-per-node``). A single
        process without torchrun needs ``local_env`` (its rendezvous address and port).
    """
    py = python or sys.executable
    if not (nproc > 1 if torchrun is None else torchrun):
        return [py, "-m", PRETRAIN_MODULE, *args]
    return [py, "-m", PRETRAIN_MODULE, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(master_port or free_port()), *launcher_args, *args]


def local_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a job on this machine: ``base`` (default ``os.environ``) without the variables of an
    enclosing launcher (``RANK``, ``SLURM_*``, ``OMPI_*``, ...), with ``OMP_NUM_THREADS`` (1 unless set) and a
    local rendezvous of its own (``MASTER_ADDR`` 127.0.0.1 and a free ``MASTER_PORT``, whatever ``base`` holds) for a
    single process; ``extra`` wins."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "SLURM_",
                                "OMPI_", "PMI", "TORCHELASTIC_", "MASTER_ADDR", "MASTER_PORT"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    # a rendezvous of its own: an inherited MASTER_PORT belongs to another job (or to an earlier in-process run
    # of this one), and two jobs started with it collide (EADDRINUSE)
    env["MASTER_ADDR"] = "127.0.0.1"
    env["MASTER_PORT"] = str(free_port())
    env.update(extra)
    return env


# ---- mdm-pretrain as a launcher ----------------------------------------------------------------------------

# torch.distributed.run's options (torch 2.13) and how many values each takes; both spellings are accepted.
# -m/--module, --no-python and --run-path are not: mdm-pretrain names the module itself.
_TORCHRUN_OPTIONS: dict[str, int] = {
    "--nnodes": 1, "--nproc-per-node": 1, "--rdzv-backend": 1, "--rdzv-endpoint": 1, "--rdzv-id": 1,
    "--rdzv-conf": 1, "--standalone": 0, "--max-restarts": 1, "--monitor-interval": 1, "--start-method": 1,
    "--event-log-handler": 1, "--role": 1, "--log-dir": 1, "--redirects": 1, "--tee": 1,
    "--local-ranks-filter": 1, "--duplicate-stdout-filters": 1, "--duplicate-stderr-filters": 1,
    "--node-rank": 1, "--master-addr": 1, "--master-port": 1, "--local-addr": 1, "--logs-specs": 1,
    "--numa-binding": 1, "--signals-to-handle": 1, "--shutdown-timeout": 1, "--virtual-local-rank": 0,
}
TORCHRUN_OPTIONS: dict[str, int] = {
    **_TORCHRUN_OPTIONS, **{k.replace("-", "_").replace("__", "--", 1): n for k, n in _TORCHRUN_OPTIONS.items()},
    "-r": 1, "-t": 1,
}
"""The torchrun flags ``mdm-pretrain`` passes to torch.distributed.run, with the number of values each takes."""

LAUNCHER_HELP = """launcher (torch.distributed.run, as torchrun takes them):
  --nproc-per-node N    worker processes on this node (also gpu, cpu, auto); with it or any torchrun flag
                        mdm-pretrain checks the configuration, then starts the workers through
                        torch.distributed.run (python -m megatron_mdm.cli.pretrain in each)
  --nnodes N, --node-rank R, --master-addr HOST, --master-port PORT, --rdzv-backend B, --rdzv-endpoint HOST:PORT,
  --rdzv-id ID, --standalone, --max-restarts N, --signals-to-handle SIGS, --shutdown-timeout S, --log-dir DIR,
  --redirects, --tee, --local-ranks-filter, ...: every torchrun flag (torchrun --help)
Without them mdm-pretrain is one worker: alone (world size 1) or one of the processes that srun, mpirun or
torchrun started (it reads their RANK / SLURM_PROCID / OMPI_COMM_WORLD_RANK / PMI_RANK variables)."""


def split_launcher_args(argv: Sequence[str], options: Mapping[str, int] | None = None) -> tuple[list[str], list[str]]:
    """(torchrun flags with their values, the rest) of ``argv``, each in its order.

    ``--flag=value`` and ``--flag value`` forms are both recognised; ``options`` maps a flag to how many
    values follow it (default :data:`TORCHRUN_OPTIONS`).
    """
    options = TORCHRUN_OPTIONS if options is None else options
    launcher: list[str] = []
    rest: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0] if tok.startswith("--") else tok
        if name in options:
            n = 0 if "=" in tok else options[name]
            launcher.extend(argv[i:i + 1 + n])
            i += 1 + n
        else:
            rest.append(tok)
            i += 1
    return launcher, rest


def launcher_world_size(launcher_args: Sequence[str]) -> int | None:
    """The number of workers ``--nproc-per-node`` x ``--nnodes`` start, or None where torchrun decides it
    (``gpu``/``auto`` processes, an elastic ``--nnodes MIN:MAX``)."""
    values: dict[str, str] = {"nproc": "1", "nnodes": "1"}
    i = 0
    while i < len(launcher_args):
        tok = launcher_args[i]
        name, _, inline = tok.partition("=")
        key = {"--nproc-per-node": "nproc", "--nproc_per_node": "nproc", "--nnodes": "nnodes"}.get(name)
        if key:
            values[key] = inline if inline else (launcher_args[i + 1] if i + 1 < len(launcher_args) else "")
        i += 1
    nnodes = values["nnodes"]
    if ":" in nnodes:
        lo, _, hi = nnodes.partition(":")
        nnodes = lo if lo == hi else ""
    try:
        return int(values["nproc"]) * int(nnodes)
    except ValueError:
        return None


def under_launcher(env: Mapping[str, str] | None = None) -> str | None:
    """The launcher that started this process (``torchrun``, ``slurm``, ``mpi``), or None."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    if any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        return "mpi"
    return None


WORKER_ERRORS_ENV = "MDM_WORKER_ERRORS"
"""Set by the launcher for its workers: the directory where each writes its one-line error instead of stderr."""


def report_worker_error(prog: str, message: str) -> int:
    """A training process's one-line error: to the launcher's directory when ``mdm-pretrain`` started it (the
    launcher prints each distinct line once, not once per rank), else on stderr. Returns exit status 2."""
    from megatron_mdm.errors import one_line, report

    where = os.environ.get(WORKER_ERRORS_ENV)
    if not where or not os.path.isdir(where):
        return report(prog, message)
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(where, f"rank{int(rank):06d}"), "w", encoding="utf-8") as f:
        f.write(f"{prog}: {one_line(message)}\n")
    return 2


def _worker_errors(where: str) -> list[str]:
    """The distinct error lines the workers wrote, in rank order."""
    lines: list[str] = []
    for name in sorted(os.listdir(where)):
        with open(os.path.join(where, name), encoding="utf-8") as f:
            line = f.read().strip()
        if line and line not in lines:
            lines.append(line)
    return lines


def run_workers(launcher_args: Sequence[str], worker_args: Sequence[str], prog: str) -> int:
    """Start the training workers through torch.distributed.run, in this process (as torchrun would).

    A worker that stops on a user's error hands its one line to this launcher, which prints each distinct line
    once; torchrun's traceback of the failure (``ChildFailedError``) and its failure log lines are left out.
    Returns the exit status: the first failed worker's (2 for a user's error), 128 + signal when this launcher
    was stopped by a signal.
    """
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from megatron_mdm.errors import report

    class _NoFailureLines(logging.Filter):  # reported here, once, instead
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            return not (msg.startswith("failed (exitcode") or "closing signal" in msg)

    quiet = _NoFailureLines()
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic.multiprocessing.api",
                                              "torch.distributed.elastic.agent.server.api")]
    for lg in loggers:
        lg.addFilter(quiet)
    before = os.environ.get(WORKER_ERRORS_ENV)
    with tempfile.TemporaryDirectory(prefix="mdm-worker-errors-") as errors:
        os.environ[WORKER_ERRORS_ENV] = errors
        try:
            run(parse_args([*launcher_args, "-m", PRETRAIN_MODULE, *worker_args]))
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            code = failure.exitcode
            lines = _worker_errors(errors)
            for line in lines:
                print(line, file=sys.stderr)
            if not lines:
                what = f"exit status {code}" if code >= 0 else f"signal {_signal_name(-code)}"
                report(prog, f"worker {rank} stopped with {what} (its output is above)")
            return code if code > 0 else 128 - code
        except SignalException as e:
            report(prog, f"stopped by {_signal_name(int(e.sigval))}: the workers were signalled")
            return 128 + int(e.sigval)
        finally:
            for lg in loggers:
                lg.removeFilter(quiet)
            if before is None:
                os.environ.pop(WORKER_ERRORS_ENV, None)
            else:
                os.environ[WORKER_ERRORS_ENV] = before
    return 0


def _signal_name(num: int) -> str:
    import signal

    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)
