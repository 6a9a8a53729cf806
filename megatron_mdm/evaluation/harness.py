"""lm-eval's own command line with the model ``mdm`` registered: ``mdm-eval harness [lm-eval arguments]``.

lm-eval finds models by name in its registry, which holds ``mdm`` only once ``lm_eval_adapter`` has been
imported; ``lm_eval --model mdm`` alone cannot know it. This runs lm-eval's command line (``lm_eval.__main__``)
in a process that has imported the adapter, with the arguments exactly as lm-eval takes them: every flag of
every lm-eval subcommand works (``run``, ``ls``, ``validate``; ``--log_samples``, ``--output_path``,
``--gen_kwargs``, ``--num_fewshot``, ``--apply_chat_template``, ``--limit``, ``--seed``, ...), e.g.

    mdm-eval harness run --model mdm --model_args pretrained=DIR,cache=dual --tasks T --include_path TASKS \\
        --log_samples --output_path results/

(``python -m megatron_mdm.evaluation.harness ...`` is the same). ``--model_args`` are the adapter's
(``lm_eval_adapter.MDMLM``); sampler settings may also come per task from ``--gen_kwargs``. An input problem of
the adapter (a missing model directory, an unknown model arg) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from megatron_mdm.errors import UserError, report


def run_harness(argv: list[str]) -> int:
    """Run lm-eval's command line on ``argv`` (the arguments after ``lm-eval``); the exit status."""
    import lm_eval.__main__ as lm_eval_main

    from megatron_mdm.evaluation import lm_eval_adapter  # noqa: F401 - registers the model "mdm"

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        lm_eval_main.cli_evaluate()
    except UserError as e:
        return report("mdm-eval harness", f"error: {e}")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(run_harness(sys.argv[1:]))
