"""Pretrain a masked diffusion LM (or the ARM baseline) with Megatron-core.

Launch with torchrun, srun or mpirun, on one node or many:

    torchrun --nproc-per-node 8 pretrain/pretrain_mdm.py --config examples/configs/smdm_1.1b.yaml \
        --tensor-model-parallel-size 2 --data-path 0.7 /data/a 0.3 /data/b --save runs/x

Options follow Megatron-LM's flag names; ``--config file.yaml`` plus flags (flags win). ``--help``
lists every option with its default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    from megatron_mdm.config import ConfigError, add_arguments, from_args, num_train_iters

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        from megatron_mdm.runtime import detect_launch_env  # torch, not yet Megatron

        cfg.validate(world_size=detect_launch_env().world_size)
        from megatron_mdm.training import pretrain

        result = pretrain(cfg)
    except ConfigError as e:
        if rank == 0:  # every rank reads the same flags: one message, not one per process
            _error(f"configuration error: {e}")
        return 2
    except Exception as e:  # clear one-line errors for the known failure kinds
        from megatron_mdm.checkpointing import CheckpointError
        from megatron_mdm.training import TrainingError

        bad_input: tuple = (CheckpointError,)
        try:
            from megatron_mdm.data.loader import DataError

            bad_input = bad_input + (DataError,)
        except ImportError:
            pass
        if isinstance(e, bad_input):  # the user can act on it: a path, a file, a flag
            _error(f"{type(e).__name__}: {e}")
            return 2
        if isinstance(e, TrainingError):
            _error(f"{type(e).__name__}: {e}")
            return 1
        raise
    if rank == 0:
        last = result["losses"][-1] if result["losses"] else float("nan")
        print(f"done: iteration {result['iteration']}, last loss {last:.4f}, "
              f"skipped steps {result['skipped_steps']}"
              + (", stopped by signal (checkpoint saved)" if result.get("stopped_by_signal") else
                 f", stopped by {result['exit_reason']} (checkpoint saved)" if result.get("exit_reason") else ""))
    return 0


def _error(message: str) -> None:
    """One line on stderr, however many lines the message has (the log keeps the details)."""
    print("pretrain_mdm.py: " + " ".join(message.split("\n")), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
