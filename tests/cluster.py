"""A real two-node Slurm cluster on this machine, started and stopped by the tests (tests/test_slurm.py), and
what the launcher tests share: a launcher-free environment and a fresh copy of the repository.

One ``slurmctld`` and two ``slurmd`` daemons (nodes ``n1`` and ``n2``, one CPU each) and a ``munged``, all
from Debian's ``slurm-wlm`` 22.05 and ``munge`` (installed with apt-get when missing; that needs root).
Everything the daemons write lives in a private directory: the munge key and socket, ``slurm.conf``
(clients and daemons find it through ``SLURM_CONF``), state, spool, pid and log files; no system file is
touched except ``/etc/hosts``, which gets ``127.0.0.1 n1 n2`` when those names do not resolve (the runtime
takes the first node of ``SLURM_JOB_NODELIST`` as the master address). The line is left in place.

One cluster per machine at a time (a file lock): a second test session waits for the first.
Job ids start at a random number so that the master port the runtime derives from the job id (20000 + id
mod 10000) differs between sessions.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from megatron_mdm.launch import free_port

REPO = Path(__file__).resolve().parents[1]
LOCK = Path(tempfile.gettempdir()) / "megatron-mdm-slurm-cluster.lock"
NODES = ("n1", "n2")
BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "munged")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE"}


def clean_env(**extra: str) -> dict:
    """This process's environment without any launcher's variables (torchrun, Slurm, MPI), plus ``extra``:
    a job started with it sees only what its own launcher sets."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "PMI",
                                "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def fresh_copy(dest: Path, repo: Path = REPO) -> Path:
    """The files a fresh clone of ``repo`` would have (tracked, and untracked but not ignored), copied to ``dest``:
    what a user who just cloned runs the launchers from (no logs/, no outputs/, no .venv)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                           capture_output=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = repo / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


def missing_reason() -> Optional[str]:
    """None when Slurm and munge are installed (installing them with apt-get as root); else why not."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return ("Slurm (slurm-wlm) and munge are not installed, and installing them with apt-get needs root "
                "(CI runs as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    still = [b for b in BINARIES if not shutil.which(b)]
    if still:
        raise RuntimeError(f"apt-get installed slurm-wlm and munge, but {still} are not on PATH")
    return None


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name).startswith("127.")
    except OSError:
        return False


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def ensure_hosts(names=NODES) -> None:
    """``names`` resolve to 127.0.0.1, and so does this machine's own name if it resolves to nothing."""
    missing = [n for n in names if not _resolves_to_loopback(n)]
    host = socket.gethostname().split(".")[0]
    if not _resolves(host):
        missing.append(host)
    if missing:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # megatron-mdm tests/cluster.py: Slurm test nodes\n")


class SlurmCluster:
    """``start()`` brings the cluster up (nodes idle), ``stop()`` ends its jobs and daemons."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="mdm-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self._daemons: list[subprocess.Popen] = []
        self._lock = None

    # -- environment --
    def env(self, base: Optional[dict] = None) -> dict:
        """An environment for Slurm's client commands (and the jobs they submit) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), env=kw.pop("env", self.env()), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout[-1500:]}{p.stderr[-1500:]}")
        return p

    # -- life cycle --
    def start(self, timeout: float = 90) -> "SlurmCluster":
        self._lock = open(LOCK, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # one cluster per machine: wait for another session's
        try:
            ensure_hosts()
            self._start_munge()
            self._write_conf()
            env = self.env()
            self._spawn(["slurmctld", "-D", "-f", str(self.conf)], env)
            for node in NODES:
                (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
                self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], env)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str], env: dict) -> None:
        name = Path(cmd[0]).name + ("-" + cmd[3] if cmd[0] == "slurmd" else "")
        out = open(self.logs / f"{name}.stdout", "w")
        self._daemons.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))

    def _start_munge(self) -> None:
        m = self.root / "munge"
        m.mkdir(parents=True)
        self.root.chmod(0o755)  # munged wants every directory above its socket searchable by all
        m.chmod(0o755)
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.logs.mkdir(exist_ok=True)
        self.munge_socket = m / "munge.socket"
        self._spawn(["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                     f"--pid-file={m / 'munged.pid'}", f"--log-file={self.logs / 'munged.log'}",
                     f"--seed-file={m / 'munged.seed'}"], dict(os.environ))
        deadline = time.time() + 30
        while not self.munge_socket.exists():
            if time.time() > deadline or self._daemons[-1].poll() is not None:
                raise RuntimeError(f"munged did not start: {self._tail('munged.log')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld, n1, n2 = (free_port() for _ in range(3))
        (self.root / "plugstack.conf").write_text("")
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=mdmtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd-%n.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "MinJobAge=3600",  # keep finished jobs visible to scontrol (state, exit code) for the tests
            "KillWait=10",
            "InactiveLimit=0",
            f"FirstJobId={random.randint(1, 90) * 100}",
            f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1} CPUs=1 State=UNKNOWN",
            f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2} CPUs=1 State=UNKNOWN",
            "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE",
            "",
        ]))
        (r / "state").mkdir(exist_ok=True)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            dead = [d.args[0] for d in self._daemons if d.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited: {self._tail('slurmctld.log')} {self._tail('slurmd-n1.log')}")
            p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=20)
            out = p.stdout + p.stderr
            states = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
            if p.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the nodes did not become idle in {timeout} s: {out} {self._tail('slurmctld.log')}")

    def _tail(self, name: str, n: int = 2000) -> str:
        path = self.logs / name
        return path.read_text(errors="replace")[-n:] if path.exists() else f"({name} missing)"

    def stop(self) -> None:
        """Cancel every job of this cluster, wait for them to end, stop the daemons we started."""
        try:
            if self.conf.exists() and self._daemons and self._daemons[0].poll() is None:
                self.run("scancel", "--full", "--user", "root", check=False, timeout=30)
                deadline = time.time() + 60
                while time.time() < deadline and self.run("squeue", "-h", check=False, timeout=20).stdout.strip():
                    time.sleep(0.5)
        finally:
            for d in reversed(self._daemons):  # slurmd, slurmctld, then munged
                if d.poll() is None:
                    d.terminate()
            for d in reversed(self._daemons):
                try:
                    d.wait(20)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait()
            self._daemons = []
            if self._lock is not None:
                self._lock.close()  # releases the lock
                self._lock = None

    # -- jobs --
    def sbatch(self, script: str, options: list[str], args: list[str], cwd: Path, env: dict) -> int:
        """Submit as a user would, ``cd cwd && sbatch OPTIONS script ARGS``; the job id."""
        p = self.run("sbatch", "--parsable", *options, script, *args, cwd=cwd, env=self.env(env))
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, NodeList, RunTime, ...)."""
        p = self.run("scontrol", "-o", "show", "job", str(job_id), timeout=20)
        fields = {}
        for item in p.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait(self, job_id: int, timeout: float) -> dict:
        """Wait until the job has ended; its ``job()`` record."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in DONE_STATES:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(0.2)

    def task_pid(self, job_id: int, rank: int, marker: str = "pretrain_mdm.py") -> Optional[int]:
        """The pid of the job's task of this rank (SLURM_PROCID) whose command line contains ``marker``."""
        want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if marker.encode() not in (proc / "cmdline").read_bytes():
                    continue
                env = set((proc / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env and b"SLURM_STEP_ID=0" in env:
                # the task itself, not a DataLoader worker (a child with the same environment)
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                try:
                    parent_cmd = Path(f"/proc/{parent}/cmdline").read_bytes()
                except OSError:
                    parent_cmd = b""
                if marker.encode() not in parent_cmd:
                    return int(proc.name)
        return None
