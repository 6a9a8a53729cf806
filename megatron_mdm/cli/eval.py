"""``mdm-eval``: likelihood evaluation of a Hugging Face MDM directory.

Subcommands:
  elbo     ELBO perplexity bound on held-out text (.txt one document per line, or .jsonl ``text``)
  mc       zero-shot scoring of a jsonl task file: multiple choice {"context" or "query", "choices", "gold"}
           (native and Mosaic forms), or Mosaic language modeling {"context", "continuation"}
  lm-eval  lm-eval harness tasks through the ``mdm`` adapter (offline; ``--include-path`` for local tasks)
  harness  lm-eval's own command line, every flag, with the model ``mdm`` registered:
           mdm-eval harness run --model mdm --model_args pretrained=DIR --tasks T --log_samples --output_path OUT

Each prints a readable table and, with ``--output``, writes the report as JSON. A bad input (a missing
``--model`` directory, a malformed ``--data`` line, a model that ships code without ``--trust-remote-code``)
is one line on stderr and exit status 2, before the model is loaded where possible.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from megatron_mdm.cli import ArgumentParser
from megatron_mdm.errors import UserError, report


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face directory (mdm-convert to-hf output)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory that is not our own export to run the Python code it ships "
                        "(auto_map); it runs with your permissions, so only for sources you trust")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch --model from the Hugging Face hub when it is a hub id missing from the local cache")
    p.add_argument("--num-samples", type=int, default=128, help="Monte Carlo draws per sequence / choice")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="unsupervised CFG scale w")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr (none: ours, lm-eval's, transformers' and datasets')")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mdm-eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("elbo", help="ELBO / perplexity bound on held-out text")
    _common(e)
    e.add_argument("--data", required=True, help=".txt or .jsonl file")
    e.add_argument("--seq-length", type=int, default=512, help="tokens per scored block")
    e.add_argument("--t-sampling", choices=("uniform", "antithetic"), default="antithetic")
    m = sub.add_parser("mc", help="jsonl task file: multiple choice (context/query, choices, gold) or Mosaic "
                                  "language modeling (context, continuation)")
    _common(m)
    m.add_argument("--data", required=True, help="jsonl file, one example per line (native or Mosaic ICL form)")
    m.add_argument("--continuation-delimiter", default="",
                   help="text put between context and continuation (llm-foundry's option; default: none)")
    m.add_argument("--method", choices=("mc", "chain"), default="mc")
    m.add_argument("--order", choices=("left_to_right", "greedy"), default="left_to_right")
    m.add_argument("--normalization", choices=("none", "token", "char"), default="none")
    m.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    sub.add_parser("harness", help="lm-eval's own command line with the model mdm registered (every lm-eval flag; "
                                   "mdm-eval harness --help)", add_help=False)
    h = sub.add_parser("lm-eval", help="lm-eval harness tasks (a few flags; every flag: mdm-eval harness)")
    _common(h)
    h.add_argument("--tasks", required=True, help="comma-separated task names")
    h.add_argument("--include-path", default=None, help="folder of local task YAMLs")
    h.add_argument("--method", choices=("mc", "chain"), default="mc")
    h.add_argument("--order", choices=("left_to_right", "greedy"), default="left_to_right")
    h.add_argument("--limit", type=float, default=None)
    h.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int, default=None,
                   help="examples in each prompt (default: the task's own, else 0)")
    h.add_argument("--apply-chat-template", "--apply_chat_template", dest="apply_chat_template", nargs="?",
                   const=True, default=False, metavar="NAME",
                   help="format prompts with the tokenizer's chat template (NAME picks one of several)")
    h.add_argument("--fewshot-as-multiturn", "--fewshot_as_multiturn", dest="fewshot_as_multiturn", nargs="?",
                   const=True, default=None, type=lambda x: x.lower() in ("true", "1", "yes"),
                   help="few-shot examples as alternating user/assistant turns (default: on with a chat template)")
    h.add_argument("--model-args", "--model_args", dest="model_args", default="",
                   help="adapter settings key=value,...: sampler (steps, gen_length, block_length, cfg_scale, "
                        "temperature, remasking, cache, threshold, factor, refresh_interval), likelihood "
                        "(num_samples, method, order, eps, max_length); these override the flags above")
    return p


def _report(report: dict[str, Any], rows: list[dict[str, Any]], columns: list[str], output: str | None) -> None:
    from megatron_mdm.evaluation.multiple_choice import format_table

    print(format_table(rows, columns))
    if output:
        with open(output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)


def _lm_eval(args: argparse.Namespace) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_mdm.evaluation import lm_eval_adapter
    from megatron_mdm.evaluation.loading import EvalInputError

    kwargs = dict(
        pretrained=args.model, method=args.method, num_samples=args.num_samples, batch_size=args.batch_size,
        order=args.order, cfg_scale=args.cfg_scale, seed=args.seed, device=args.device,
        trust_remote_code=args.trust_remote_code, allow_download=args.allow_download, progress=not args.no_progress,
    )
    kwargs.update(model_args(args.model_args, lm_eval_adapter.MDMLM))
    multiturn = bool(args.apply_chat_template) if args.fewshot_as_multiturn is None else args.fewshot_as_multiturn
    if multiturn and not args.apply_chat_template:
        raise EvalInputError("--fewshot-as-multiturn needs --apply-chat-template")
    lm = lm_eval_adapter.MDMLM(**kwargs)
    if args.apply_chat_template and not lm.chat_template(args.apply_chat_template):
        raise EvalInputError(f"--apply-chat-template: the tokenizer of {args.model} has no chat template "
                             "(chat_template in tokenizer_config.json or chat_template.jinja)")
    results = lm_eval.simple_evaluate(
        model=lm, tasks=args.tasks.split(","), task_manager=TaskManager(include_path=args.include_path),
        limit=args.limit, random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed, num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=multiturn, log_samples=False, bootstrap_iters=0,
    )
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "_stderr" not in key:
                name, _, filt = key.partition(",")
                err = metrics.get(f"{name}_stderr,{filt}")
                rows.append({"task": task, "metric": name, "value": value, "stderr": err if err is not None else ""})
    report = {"results": results["results"], "n-shot": results.get("n-shot", {}), "config": vars(args)}
    _report(report, rows, ["task", "metric", "value", "stderr"], args.output)


def model_args(text: str, cls: type) -> dict[str, str]:
    """``key=value,...`` as lm-eval parses it; a key that ``cls`` does not take is an error naming it."""
    import inspect

    from lm_eval.utils import simple_parse_args_string

    from megatron_mdm.evaluation.loading import EvalInputError

    bad = [a for a in text.split(",") if a.strip() and "=" not in a]
    if bad:
        raise EvalInputError(f"--model-args: {bad[0]!r} is not key=value")
    parsed = simple_parse_args_string(text)
    known = [n for n, p in inspect.signature(cls.__init__).parameters.items()
             if n != "self" and p.kind is not p.VAR_KEYWORD]
    unknown = sorted(set(parsed) - set(known))
    if unknown:
        raise EvalInputError(f"--model-args: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return parsed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:  # everything after it is lm-eval's
        from megatron_mdm.evaluation.harness import run_harness

        return run_harness(argv[1:])
    args = build_parser().parse_args(argv)
    if args.no_progress:
        from megatron_mdm.cli import hide_progress_bars

        hide_progress_bars()
    try:
        _run(args)
    except UserError as e:
        return report("mdm-eval", f"error: {e}")
    return 0


def _run(args: argparse.Namespace) -> None:
    import torch

    from megatron_mdm.evaluation.loading import load_logits_fn, resolve_model_dir

    resolve_model_dir(args.model, args.allow_download)  # a missing directory fails before anything loads
    if args.command == "lm-eval":
        _lm_eval(args)
        return
    # the data first: a malformed line fails at start, not after the model has loaded
    if args.command == "elbo":
        from megatron_mdm.evaluation.corpus import corpus_elbo, read_texts

        texts, examples = read_texts(args.data), None
    else:
        from megatron_mdm.evaluation.jsonl_tasks import read_task_file

        task = read_task_file(args.data, args.continuation_delimiter)
        texts, examples = None, task.examples[: args.limit]
    if not (texts if args.command == "elbo" else examples):
        from megatron_mdm.evaluation.loading import EvalInputError

        what = "document" if args.command == "elbo" else "example"
        raise EvalInputError(f"--data {args.data}: holds no {what} to evaluate (an empty file, only blank lines, "
                             "or --limit 0)")
    logits_fn, tok, mask_id, vocab_size = load_logits_fn(
        args.model, args.device, trust_remote_code=args.trust_remote_code, allow_download=args.allow_download)
    g = torch.Generator().manual_seed(args.seed)
    if args.command == "elbo":
        r = corpus_elbo(
            logits_fn, tok.encode, texts, mask_id, args.seq_length, args.num_samples,
            args.t_sampling, generator=g, vocab_size=vocab_size, batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        _report({**r, "data": args.data, "model": args.model}, [r], list(r), args.output)
    elif task.kind == "lm":
        from megatron_mdm.evaluation.jsonl_tasks import score_language_modeling

        r = score_language_modeling(
            logits_fn, tok.encode, examples, mask_id, progress=not args.no_progress, method=args.method,
            num_samples=args.num_samples, generator=g, vocab_size=vocab_size, cfg_scale=args.cfg_scale,
            batch_size=args.batch_size, order=args.order,
        )
        row = {"data": args.data, "form": task.form, "method": args.method, **r.to_dict()}
        _report({**row, "per_example": r.per_example}, [row], list(row), args.output)
    else:
        from megatron_mdm.evaluation.multiple_choice import score_multiple_choice

        r = score_multiple_choice(
            logits_fn, tok.encode, examples, mask_id, args.method, args.normalization, args.num_samples, g,
            vocab_size, args.cfg_scale, args.batch_size, args.order, progress=not args.no_progress,
        )
        row = {"data": args.data, "form": task.form, "method": args.method, "normalization": args.normalization,
               **r.to_dict()}
        _report({**row, "per_example": r.per_example}, [row], list(row), args.output)


if __name__ == "__main__":
    raise SystemExit(main())
