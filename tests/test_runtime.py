"""Launcher detection (torchrun, SLURM, MPI) and the CPU fallback's reversibility."""

import torch

from megatron_mdm.runtime import detect_launch_env


def test_torchrun_env():
    e = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
                           "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (3, 8, 1, "n0", 1234, "torchrun")


def test_slurm_env_master_is_first_host():
    e = detect_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                           "SLURM_JOB_NODELIST": "gpu[017-018,020]", "SLURM_JOB_ID": "4242"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (5, 16, 5, "slurm")
    assert e.master_addr == "gpu017" and e.master_port == 20000 + 4242 % 10000


def test_openmpi_and_mpich_env():
    e = detect_launch_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "MASTER_ADDR": "h"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (1, 2, 1, "mpi")
    e = detect_launch_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (2, 4, 0, "mpi")


def test_single_process_default():
    assert detect_launch_env({}).world_size == 1


def test_cpu_fallback_enable_disable_restores_torch():
    from megatron_mdm import cpu_fallback

    before = (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type)
    cpu_fallback.enable()
    try:
        assert torch.cuda.current_device() == "cpu"
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    finally:
        cpu_fallback.disable()
    assert (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type) == before
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_free_port_is_bindable_and_outside_the_ephemeral_range(tmp_path, monkeypatch):
    import socket

    from megatron_mdm import launch as ports

    lo, hi = ports.ephemeral_range()
    seen = set()
    for _ in range(20):
        port = ports.free_port()
        assert not lo <= port <= hi and 1024 < port < 65536
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free now
        seen.add(port)
    assert len(seen) > 10  # drawn at random, not a fixed sequence that concurrent callers would share
    (tmp_path / "range").write_text(f"{10000 + 1001}\t65535\n")
    assert ports.ephemeral_range(str(tmp_path / "range")) == (11001, 65535)
    assert ports.ephemeral_range(str(tmp_path / "missing")) == (49152, 65535)
    # where no band is free of the ephemeral range, the kernel chooses
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
