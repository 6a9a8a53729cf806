"""Pretrain a masked diffusion LM (or the ARM baseline) with Megatron-core.

    mdm-pretrain --nproc-per-node 8 --config examples/configs/smdm_1.1b.yaml \
        --tensor-model-parallel-size 2 --data-path 0.7 /data/a 0.3 /data/b --save runs/x

With --nproc-per-node (or any torchrun flag) mdm-pretrain is the launcher: it checks the configuration (flags,
YAML, tokenizer, data, the parallel layout against the number of workers) and only then starts the workers
through torch.distributed.run; a bad option is one line on stderr and exit status 2. Without them it is one
training process: alone, or one of those that srun, mpirun or torchrun started. python -m
megatron_mdm.cli.pretrain and pretrain/pretrain_mdm.py are the same program.

Options follow Megatron-LM's flag names; --config file.yaml plus flags (flags win); precedence: defaults <
--preset < YAML < flags.
"""

from __future__ import annotations

import logging
import os
import sys


def _parser(prog: str):
    from megatron_mdm.cli import ArgumentParser
    from megatron_mdm.config import add_arguments
    from megatron_mdm.launch import LAUNCHER_HELP

    parser = ArgumentParser(prog=prog, description=__doc__, epilog=LAUNCHER_HELP,
                            usage="%(prog)s [--nproc-per-node N [torchrun flags]] [--config YAML] [options]")
    add_arguments(parser)
    return parser


def main(argv=None, prog: str = "mdm-pretrain") -> int:
    """Check the configuration, then train here or start the workers; 0 when done, 2 for a user's error."""
    from megatron_mdm.launch import split_launcher_args, under_launcher

    argv = sys.argv[1:] if argv is None else list(argv)
    launcher_args, train_argv = split_launcher_args(argv)
    args = _parser(prog).parse_args(train_argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("OMPI_COMM_WORLD_RANK", 0))))
    if launcher_args and under_launcher() == "torchrun":
        return _error(prog, f"{launcher_args[0].split('=')[0]}: this process is already a worker that torchrun "
                            "started: give the launcher flags to torchrun, or run mdm-pretrain without torchrun")
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from megatron_mdm.config import ConfigError
    from megatron_mdm.errors import UserError

    try:
        cfg = _checked_config(args)  # no torch import yet: a bad flag fails in a fraction of a second
        if launcher_args:
            from megatron_mdm.launch import launcher_world_size, run_workers
            from megatron_mdm.training.data import resolve_config  # torch, not Megatron

            resolve_config(cfg)  # the tokenizer and the data exist and agree, before any worker starts
            world = launcher_world_size(launcher_args)
            if world is not None:
                cfg.validate(world_size=world)
            return run_workers(launcher_args, train_argv, prog)
        from megatron_mdm.runtime import detect_launch_env, hide_known_cpu_warnings  # torch, not yet Megatron

        hide_known_cpu_warnings()  # before Megatron's imports, which raise some of them
        cfg.validate(world_size=detect_launch_env().world_size)
        from megatron_mdm.training.loop import pretrain

        result = pretrain(cfg)
    except ConfigError as e:
        if rank == 0:  # every rank reads the same flags: one message, not one per process
            _error(prog, f"configuration error: {e}")
        return 2
    except UserError as e:  # the user can act on it: a path, a file, a flag
        return _error(prog, f"{type(e).__name__}: {e}")
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
              + (", stopped by signal (checkpoint saved)" if result.get("stopped_by_signal") else
                 f", stopped by {result['exit_reason']} (checkpoint saved)" if result.get("exit_reason") else ""))
    return 0


def _checked_config(args):
    """The config of the flags, checked as far as it can be without torch (ranges, consistency, budget)."""
    from megatron_mdm.config import ConfigError, from_args, num_train_iters

    cfg = from_args(args)
    cfg.validate()
    num_train_iters(cfg)
    if cfg.checkpoint.save:  # a file, a read-only file system: before any worker starts
        from megatron_mdm.checkpoint.lock import directory_problem

        problem = directory_problem(cfg.checkpoint.save)
        if problem is not None:
            raise ConfigError(f"--save: {problem}")
    return cfg


def _error(prog: str, message: str) -> int:
    """One line, however many lines the message has (the log keeps the details): on stderr, or handed to the
    launcher that started this worker (which prints it once for all ranks); exit status 2."""
    from megatron_mdm.launch import report_worker_error

    return report_worker_error(prog, message)


if __name__ == "__main__":
    sys.exit(main())
