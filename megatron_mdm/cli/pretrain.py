"""Pretrain a masked diffusion LM (or the ARM baseline) with Megatron-core: one training process.

Launch with torchrun, srun or mpirun, on one node or many (``pretrain/pretrain_mdm.py`` is the same entry as a
script; ``megatron_mdm.launch.pretrain_command`` builds the command line):

    torchrun --nproc-per-node 8 -m megatron_mdm.cli.pretrain --config examples/configs/smdm_1.1b.yaml \
        --tensor-model-parallel-size 2 --data-path 0.7 /data/a 0.3 /data/b --save runs/x

Options follow Megatron-LM's flag names; ``--config file.yaml`` plus flags (flags win). ``--help``
lists every option with its default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None, prog: str = "mdm-pretrain") -> int:
    """Parse the flags, check the configuration, train; 0 when done, 2 for a user's error (one line on stderr)."""
    from megatron_mdm.config import ConfigError, add_arguments, from_args, num_train_iters
    from megatron_mdm.errors import UserError

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("OMPI_COMM_WORLD_RANK", 0))))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # every check that needs no torch / Megatron import first, so a bad flag fails in a fraction of a second
        cfg = from_args(args)
        cfg.validate()
        num_train_iters(cfg)
        if cfg.checkpoint.save:  # a file, a read-only file system: before any worker starts
            from megatron_mdm.checkpoint.lock import directory_problem

            problem = directory_problem(cfg.checkpoint.save)
            if problem is not None:
                raise ConfigError(f"--save: {problem}")
        from megatron_mdm.runtime import detect_launch_env  # torch, not yet Megatron

        cfg.validate(world_size=detect_launch_env().world_size)
        from megatron_mdm.training.loop import pretrain

        result = pretrain(cfg)
    except ConfigError as e:
        if rank == 0:  # every rank reads the same flags: one message, not one per process
            _error(prog, f"configuration error: {e}")
        return 2
    except UserError as e:  # the user can act on it: a path, a file, a flag
        _error(prog, f"{type(e).__name__}: {e}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (once it runs, Ctrl-C saves and exits 0)
        _error(prog, "interrupted before training started: nothing was trained or saved")
        return 130
    except Exception as e:
        from megatron_mdm.training.loop import TrainingError

        if isinstance(e, TrainingError):  # e.g. too many non-finite steps: not the user's input, exit 1
            _error(prog, f"{type(e).__name__}: {e}")
            return 1
        raise
    if rank == 0:
        last = result["losses"][-1] if result["losses"] else float("nan")
        print(f"done: iteration {result['iteration']}, last loss {last:.4f}, "
              f"skipped steps {result['skipped_steps']}"
              + (", stopped by signal (checkpoint saved)" if result.get("stopped_by_signal") else ""))
    return 0


def _error(prog: str, message: str) -> None:
    """One line on stderr, however many lines the message has (the log keeps the details)."""
    from megatron_mdm.errors import report

    report(prog, message)


if __name__ == "__main__":
    sys.exit(main())
