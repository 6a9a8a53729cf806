"""Shared pytest setup: markers, and keeping BLAS single-threaded on the 2-core CI machine."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still part of the default run)")
    config.addinivalue_line("markers", "dist: launches several gloo processes")
    config.addinivalue_line("markers", "slurm: runs jobs on a real Slurm cluster it starts (tests/cluster.py; root)")
