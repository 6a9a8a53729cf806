"""Diffusive adaptation at CPU scale: an MDM started from an ARM or a masked LM vs the same MDM from scratch.

    python examples/adaptation/run.py --output runs/adaptation                  # ~25 min on 2 idle CPU cores
    python examples/adaptation/run.py --output /tmp/ad --arm-steps 4 --mlm-steps 4 --steps 4 --eval-interval 2

The same commands a user runs, one process each, on the shipped Tiny Shakespeare corpus (a step whose
output exists is skipped, so an interrupted run continues and a finished one only redraws the results):

1. tokenizer (byte-level BPE, 2048 ids) and shards (sequence 128, 5% of documents for validation);
2. **AR start**: pretrain an ARM (``--objective arm``, ``--preset``, default ``quickstart``) for ``--arm-steps``,
   export it (``mdm-convert to-hf``: a ``LlamaForCausalLM``), import it as an MDM (``mdm-convert from-hf``),
   then train the MDM ``--steps`` steps from it, plain and with ``--shift-logits --attention-anneal-iters``;
3. **MLM start**: train a ``RobertaForMaskedLM`` of the same width with plain ``transformers`` (15% masking,
   80/10/10) on the same training split for ``--mlm-steps``, import it, train the MDM ``--steps`` steps;
4. **from scratch**: the same two architectures, randomly initialised, the same data and schedule: once for
   ``--steps`` (the same MDM steps) and once for the pretraining steps plus ``--steps`` (**equal compute**: an
   ARM or MLM step costs what an MDM step of the same model costs, 6·N per token, so the adapted runs have
   spent ``--arm-steps`` / ``--mlm-steps`` more steps in all).

Every MDM run logs its validation ELBO (nats/token, the in-training estimate on the validation split, one
draw of t and masks per sequence with fixed seeds) every ``--eval-interval`` steps from step 0. The script
writes ``results.json`` (the curves), ``results.md`` (a table) and, when matplotlib is importable,
``adaptation.png`` to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "tinyshakespeare.txt.zst"


def sh(cmd: list[str], log: Path) -> None:
    """Run one command (this checkout on PYTHONPATH), its output to ``log``; stop with the log's tail on failure."""
    from megatron_mdm.launch import free_port

    port = free_port()  # a free rendezvous port: other jobs may hold the default 29500
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), MASTER_PORT=str(port))
    t0 = time.perf_counter()
    print(f"$ {' '.join(str(c) for c in cmd)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"failed (rc {rc}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-20:]))
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)


def curve(run: Path) -> list[tuple[int, float]]:
    """(iteration, validation ELBO) of a run's metrics.jsonl."""
    from megatron_mdm.checkpoint import layout

    out = []
    for line in layout.metrics_file(run).read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            out.append((int(rec["iteration"]), float(rec["val_loss"])))
    return out


def train_roberta(tok_dir: Path, shards: Path, out: Path, steps: int, seq: int, hidden: int, layers: int,
                  heads: int, ffn: int, seed: int) -> None:
    """A small RobertaForMaskedLM trained with plain transformers (MLM, 15% of tokens, 80/10/10)."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    from megatron_mdm.data.loader import build_pretrain_loader
    from megatron_mdm.tokenization import MDMTokenizer

    torch.manual_seed(seed)
    tok = MDMTokenizer.load(tok_dir)
    cfg = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=seq + tok.pad_id + 1,
                        pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, type_vocab_size=1,
                        layer_norm_eps=1e-5, tie_word_embeddings=True)
    model = RobertaForMaskedLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    loader = iter(build_pretrain_loader([(1.0, str(shards))], seq, 32, 32, 0, 1, num_workers=0, seed=seed,
                                        tokenizer_hash=tok.hash))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        x = next(loader)["tokens"]  # [32, seq]
        chosen = torch.rand(x.shape, generator=g) < 0.15
        r = torch.rand(x.shape, generator=g)
        inputs = torch.where(chosen & (r < 0.8), tok.mask_id, x)
        rand_ids = torch.randint(0, tok.vocab_size, x.shape, generator=g)
        inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_ids, inputs)
        loss = model(input_ids=inputs, labels=torch.where(chosen, x, -100)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            rate = (step + 1) / (time.perf_counter() - t0)
            print(f"  roberta step {step + 1}/{steps} mlm loss {loss.item():.3f} ({rate:.1f} steps/s, "
                  f"ETA {(steps - step - 1) / rate:.0f} s)", flush=True)
    model.save_pretrained(str(out))
    tok.save(out)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the curves are in results.json / results.md)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = (("Llama stack: from an ARM vs from scratch",
               ("scratch_llama", "scratch_llama_equal", "from_arm", "from_arm_shift_anneal")),
              ("BERT stack: from a RoBERTa MLM vs from scratch", ("scratch_bert", "scratch_bert_equal", "from_mlm")))
    offset = results.get("offset", {})
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            pts = results["curves"].get(name)
            if pts:
                ax.plot([offset.get(name, 0) + p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        linestyle="--" if name in ("scratch_llama", "scratch_bert") else "-",
                        label=results["labels"][name])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training steps in all (pretraining + MDM: equal compute at equal x)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation ELBO (nats/token, upper bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", help="working directory (tokenizer, shards, runs, results)")
    ap.add_argument("--replot", nargs=2, metavar=("RESULTS_JSON", "PNG"),
                    help="only redraw the figure from a results.json (e.g. the one shipped in docs/results/adaptation)")
    ap.add_argument("--arm-steps", type=int, default=400, help="ARM pretraining steps")
    ap.add_argument("--mlm-steps", type=int, default=400, help="RoBERTa MLM pretraining steps")
    ap.add_argument("--steps", type=int, default=300, help="MDM steps of every compared run (K)")
    ap.add_argument("--anneal-iters", type=int, default=100, help="--attention-anneal-iters of the annealed run")
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--eval-iters", type=int, default=8, help="validation micro-batches per evaluation")
    ap.add_argument("--preset", default="quickstart", help="model size of the Llama-stack runs (the encoder matches "
                                                          "its layers, width and heads, with a GELU MLP of 4x width)")
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--global-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    if args.replot:
        return 0 if plot(json.loads(Path(args.replot[0]).read_text()), Path(args.replot[1])) else 1
    if not args.output:
        ap.error("--output is required (or --replot)")
    sys.path.insert(0, str(ROOT))  # megatron_mdm from this checkout (the RoBERTa step runs in this process)
    from megatron_mdm.checkpoint import layout
    out = Path(args.output).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    convert = [py, "-m", "megatron_mdm.cli.convert"]
    tok, shards, runs = out / "tok", out / "shards", out / "runs"
    if not (tok / "tokenizer.json").is_file():
        sh([py, "tokenizer/train_tokenizer.py", "--input", CORPUS, "--vocab-size", "2048", "--output", tok],
           out / "logs" / "tokenizer.log")
    if not (shards / "manifest.json").is_file():
        sh([py, "data_prep/prepare_data.py", "--input", CORPUS, "--tokenizer", tok, "--output", shards,
            "--seq-length", "128", "--val-fraction", "0.05", "--workers", "1"], out / "logs" / "shards.log")
    # the schedule every compared MDM run shares (the ARM pretraining uses it too)
    common = ["--tokenizer", tok, "--data-path", shards, "--seq-length", "128", "--micro-batch-size",
              str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size), "--lr", "3e-3",
              "--min-lr", "3e-4", "--lr-warmup-iters", "20",
              "--lr-decay-style", "cosine", "--t-sampling", "antithetic", "--eval-interval", str(args.eval_interval),
              "--eval-iters", str(args.eval_iters), "--log-interval", "25", "--num-workers", "1", "--seed", str(args.seed)]
    fresh = ["--make-vocab-size-divisible-by", "64"]  # runs from a checkpoint take it (and all shapes) from it
    from megatron_mdm.launch import pretrain_command

    pretrain = pretrain_command(python=py)

    def mdm(name: str, extra: list, iters: int = args.steps) -> None:
        run = runs / name
        if not layout.metrics_file(run).is_file() or layout.read_latest_iteration(run) is None:
            sh(pretrain + common + ["--objective", "mdm", "--train-iters", str(iters), "--save", run] + extra,
               out / "logs" / f"{name}.log")

    # -- AR start
    if layout.read_latest_iteration(out / "arm") is None:
        sh(pretrain + common + fresh + ["--preset", args.preset, "--objective", "arm", "--train-iters", str(args.arm_steps),
                                "--save", out / "arm"], out / "logs" / "arm.log")
    if not (out / "arm-hf" / "config.json").is_file():
        sh(convert + ["to-hf", "--load", out / "arm", "--output", out / "arm-hf"], out / "logs" / "arm-export.log")
    if layout.read_latest_iteration(out / "arm-import") is None:
        sh(convert + ["from-hf", "--hf", out / "arm-hf", "--output", out / "arm-import", "--objective", "mdm"],
           out / "logs" / "arm-import.log")
    mdm("scratch_llama", fresh + ["--preset", args.preset])
    mdm("scratch_llama_equal", fresh + ["--preset", args.preset], args.arm_steps + args.steps)
    mdm("from_arm", ["--load", out / "arm-import", "--finetune"])
    mdm("from_arm_shift_anneal", ["--load", out / "arm-import", "--finetune", "--shift-logits",
                                  "--attention-anneal-iters", str(args.anneal_iters)])
    # -- MLM start: the layers, width and heads of the preset, GELU 4h, post-LN
    from megatron_mdm.presets import get_preset

    size = get_preset(args.preset)
    enc = {"hidden": size["hidden_size"], "layers": size["num_layers"], "heads": size["num_attention_heads"],
           "ffn": 4 * size["hidden_size"]}
    if not (out / "roberta-hf" / "config.json").is_file():
        print("$ train RobertaForMaskedLM with transformers", flush=True)
        train_roberta(tok, shards, out / "roberta-hf", args.mlm_steps, 128, seed=args.seed, **enc)
    if layout.read_latest_iteration(out / "mlm-import") is None:
        sh(convert + ["from-hf", "--hf", out / "roberta-hf", "--output", out / "mlm-import"],
           out / "logs" / "mlm-import.log")
    mdm("from_mlm", ["--load", out / "mlm-import", "--finetune"])
    from megatron_mdm.tokenization import MDMTokenizer

    pad = MDMTokenizer.load(tok).pad_id
    bert = fresh + ["--architecture", "bert", "--num-layers", str(enc["layers"]), "--hidden-size", str(enc["hidden"]),
                    "--num-attention-heads", str(enc["heads"]), "--ffn-hidden-size", str(enc["ffn"]),
                    "--max-position-embeddings", str(128 + pad + 1), "--num-tokentypes", "1", "--position-padding-idx",
                    str(pad), "--norm-epsilon", "1e-5", "--no-untie-embeddings-and-output-weights"]
    mdm("scratch_bert", bert)
    mdm("scratch_bert_equal", bert, args.mlm_steps + args.steps)
    labels = {
        "scratch_llama": "Llama-stack MDM from scratch",
        "from_arm": f"from the ARM ({args.arm_steps} AR steps)",
        "from_arm_shift_anneal": f"from the ARM, --shift-logits --attention-anneal-iters {args.anneal_iters}",
        "scratch_bert": "BERT-stack MDM from scratch",
        "from_mlm": f"from the RoBERTa MLM ({args.mlm_steps} MLM steps)",
        "scratch_llama_equal": f"Llama-stack MDM from scratch, {args.arm_steps + args.steps} steps (equal compute)",
        "scratch_bert_equal": f"BERT-stack MDM from scratch, {args.mlm_steps + args.steps} steps (equal compute)",
    }
    # training steps spent before each run's step 0 (its pretraining): the x offset of equal compute
    offset = {"from_arm": args.arm_steps, "from_arm_shift_anneal": args.arm_steps, "from_mlm": args.mlm_steps}
    results = {"steps": args.steps, "arm_steps": args.arm_steps, "mlm_steps": args.mlm_steps, "labels": labels,
               "offset": offset, "curves": {name: curve(runs / name) for name in labels}}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    its = sorted({i for c in results["curves"].values() for i, _ in c})
    shown = [i for i in its if i in (0, its[-1]) or i % max(args.eval_interval, args.steps // 6) == 0]
    rows = ["| run | " + " | ".join(f"step {i}" for i in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name, label in labels.items():
        if name.endswith("_equal"):
            continue
        c = dict(results["curves"][name])
        rows.append(f"| {label} | " + " | ".join(f"{c[i]:.3f}" if i in c else "" for i in shown) + " |")
    rows += ["", "At equal compute (total training steps, pretraining included; final validation ELBO):", "",
             "| run | total steps | final validation ELBO |", "|---|---|---|"]
    for name in ("from_arm", "from_arm_shift_anneal", "scratch_llama_equal", "from_mlm", "scratch_bert_equal"):
        c = results["curves"][name]
        rows.append(f"| {labels[name]} | {offset.get(name, 0) + c[-1][0]} | {c[-1][1]:.3f} |")
    table = "\n".join(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    if plot(results, out / "adaptation.png"):
        print(f"plot: {out / 'adaptation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
