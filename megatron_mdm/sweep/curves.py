"""Training curves of runs (``metrics.jsonl``), the unigram reference level, and their picture (``mdm-plot``).

A run directory (``--save``) holds ``metrics.jsonl`` (one JSON object per logged step: iteration,
consumed_samples, loss, lr, tokens_per_sec, ...; one per evaluation: iteration, val_loss) and
``config.yaml``. A resumed run appends to the same file, so records are keyed by iteration and the
last record of an iteration wins (a step replayed after a restart from an older checkpoint replaces
the first attempt).

x axes: ``iterations``; ``tokens`` = consumed_samples x seq_length; ``flops`` = 6·N·tokens with N the
non-embedding parameters (the scaling paper's C = 6·N·D, the same for MDM and ARM).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_mdm.checkpoint import layout
from megatron_mdm.errors import UserError

X_AXES = ("iterations", "tokens", "flops")


class RunError(UserError, ValueError):
    """A run directory lacks what is needed (metrics.jsonl, config.yaml); the message names the file."""


@dataclass
class RunCurves:
    """The curves of one run.

    Attributes:
        path: run directory.
        label: legend label (the directory name unless given).
        objective: ``mdm`` or ``arm`` (from config.yaml; None when absent).
        seq_length, global_batch_size: from config.yaml (None when absent).
        non_embedding_params: N of C = 6·N·D (None without config.yaml).
        train: training records sorted by iteration (deduplicated).
        val: evaluation records sorted by iteration (deduplicated).
        starts: the start records (``"event": "start"``) in file order: where the run began and resumed.
        previous: the run this one continues (a ``--load X --finetune`` start whose X has metrics), drawn
            before it; None otherwise.
    """

    path: Path
    label: str
    objective: str | None = None
    seq_length: int | None = None
    global_batch_size: int | None = None
    non_embedding_params: int | None = None
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    starts: list[dict] = field(default_factory=list)
    previous: RunCurves | None = None

    def resumes(self) -> list[int]:
        """Iterations this run was resumed at (a start past iteration 0 that is not a finetuning start)."""
        return sorted({int(r["iteration"]) for r in self.starts if r["iteration"] > 0 and not r.get("finetune")})

    def offset(self, axis: str) -> float:
        """Where this run's x = 0 sits when drawn after the run it continues (0 without one)."""
        prev = self.previous
        if prev is None:
            return 0.0
        start = next((r for r in self.starts if r["iteration"] == 0 and r.get("finetune")), {})
        end = start.get("loaded_iteration")
        recs = [r for r in prev.train + prev.val if end is None or r["iteration"] <= end]
        if not recs:
            return 0.0
        last = max(recs, key=lambda r: r["iteration"])
        return float(prev.x([last], axis)[0] + prev.offset(axis))

    def final_val_loss(self) -> float | None:
        return self.val[-1]["val_loss"] if self.val else None

    def x(self, records: list[dict], axis: str) -> np.ndarray:
        """The x values of ``records`` on ``axis`` (iterations, tokens or flops)."""
        it = np.array([r["iteration"] for r in records], dtype=np.float64)
        if axis == "iterations":
            return it
        if axis not in X_AXES:
            raise ValueError(f"unknown x axis {axis!r}; choose from {', '.join(X_AXES)}")
        if self.seq_length is None:
            raise RunError(f"{self.path}: no config.yaml with seq_length, needed for --x {axis}")
        samples = []
        for r, i in zip(records, it):
            cs = r.get("consumed_samples")
            if cs is None:  # evaluation records written before consumed_samples existed
                if self.global_batch_size is None:
                    raise RunError(f"{self.path}: records without consumed_samples and no global_batch_size")
                cs = i * self.global_batch_size
            samples.append(cs)
        tokens = np.asarray(samples, dtype=np.float64) * self.seq_length
        if axis == "tokens":
            return tokens
        if self.non_embedding_params is None:
            raise RunError(f"{self.path}: no model size in config.yaml, needed for --x flops")
        return 6.0 * self.non_embedding_params * tokens


def read_metrics(path: str | Path, starts: list | None = None) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of ``path/metrics.jsonl``, each sorted by iteration with
    one record per iteration (the last written wins). Unparseable lines (a crash mid-write) are skipped; start
    records are appended to ``starts`` when it is given."""
    f = layout.metrics_file(path)
    if not f.is_file():
        raise RunError(f"{f}: no such file (is {path} a run directory written with --save?)")
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for line in f.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "iteration" not in rec:
            continue
        if rec.get("event") == "start":
            if starts is not None:
                starts.append(rec)
        elif "val_loss" in rec:
            val[int(rec["iteration"])] = rec
        elif "loss" in rec:
            train[int(rec["iteration"])] = rec
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def load_run(path: str | Path, label: str | None = None, previous: bool = True) -> RunCurves:
    """Read a run directory's metrics and, when present, its config.yaml (objective, length, N).

    With ``previous``, a run that started as ``--load X --finetune`` (its start record says so) gets the run
    in X as ``previous`` when X has metrics (e.g. the quickstart's ARM warm start), recursively.
    """
    path = Path(path)
    starts: list[dict] = []
    train, val = read_metrics(path, starts)
    run = RunCurves(path=path, label=label or path.resolve().name, train=train, val=val, starts=starts)
    cfg_file = layout.config_file(path)
    if cfg_file.is_file():
        from megatron_mdm.config import Config

        cfg = Config.from_dict(_yaml(cfg_file), source=str(cfg_file))
        run.objective = cfg.objective.objective
        run.seq_length = cfg.data.seq_length
        run.global_batch_size = cfg.optim.global_batch_size
        run.non_embedding_params = non_embedding_params(cfg.model)
    first = next((r for r in starts if r["iteration"] == 0 and r.get("finetune") and r.get("loaded_from")), None)
    if previous and first is not None:
        src = Path(first["loaded_from"])
        src = src if src.is_absolute() or src.exists() else path / src
        if layout.metrics_file(src).is_file() and src.resolve() != path.resolve():
            run.previous = load_run(src, src.resolve().name)
    return run


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def non_embedding_params(model_cfg) -> int:
    """N (non-embedding parameters) of a ModelConfig, by ``megatron_mdm.models.flops.count_parameters``."""
    from megatron_mdm.sweep.plan import Shape, shape_params

    return shape_params(Shape("run", {k: getattr(model_cfg, k) for k in
                                      ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                       "ffn_hidden_size")}))


def unigram_entropy(data_dir: str | Path) -> float:
    """Entropy in nats/token of the empirical unigram distribution of a dataset's validation tokens.

    ``data_dir`` is a prepared dataset (its ``valid/`` split is used when the manifest names one) or a
    split directory itself. Every position of a packed pretraining sequence is in the loss, so this
    is the validation loss (and MDM ELBO) of the best model that ignores context: a run that ends
    below it has learned to use context.
    """
    from megatron_mdm.data import format as fmt
    from megatron_mdm.data.loader import build_valid_loader

    d = Path(data_dir)
    m = fmt.read_manifest(d)
    if m.get("valid"):
        d = d / m["valid"]
        m = fmt.read_manifest(d)
    n = int(m["num_samples"])
    counts = np.zeros(int(m["vocab_size"]) + 1, dtype=np.int64)
    it = iter(build_valid_loader([(1.0, str(d))], int(m["seq_length"]), 1, 0, 1, verify="none"))
    for _ in range(n):
        ids = next(it)["tokens"].numpy().ravel()
        counts += np.bincount(ids, minlength=len(counts))[: len(counts)]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---- the picture -----------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RunError("plotting needs matplotlib: pip install 'megatron-mdm[sweep]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, output: str | Path, dpi: int = 80, layout: bool = True) -> Path:
    """Lay out (unless ``layout`` is False: the figure did), write (creating the folder) and close a matplotlib
    figure; returns the path."""
    if layout:
        fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def plot_runs(runs: list[RunCurves], output: str | Path, x: str = "iterations", log_x: bool = False,
              reference: float | None = None, reference_label: str = "unigram entropy",
              title: str | None = None) -> Path:
    """Draw :func:`figure` into the PNG ``output``; returns its path."""
    fig = figure(runs, x, log_x, reference, reference_label, title)
    return save_figure(fig, output, dpi=90, layout=False)  # figure() laid it out around the legend below


def figure(runs: list[RunCurves], x: str = "iterations", log_x: bool = False, reference: float | None = None,
           reference_label: str = "unigram entropy", title: str | None = None):
    """One PNG with four panels: training loss, validation loss (ELBO for MDM runs), learning rate and
    throughput (tokens/s), every run as one line per panel. A run that continues another (``previous``) is
    drawn after it, the earlier run dashed in the same colour; a resume is a dotted vertical line.
    ``reference`` draws a horizontal line on the loss panels (e.g. the unigram entropy of the validation data).
    Every line is in the legend below the panels."""
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; choose from {', '.join(X_AXES)}")
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    xlabel = {"iterations": "iteration", "tokens": "tokens", "flops": "FLOPs (6·N·D)"}[x]
    objectives = {r.objective for run in runs for r in _chain(run)}
    val_name = "validation ELBO (nats/token)" if objectives == {"mdm"} else \
        "validation loss (nats/token; ELBO for MDM)"
    panels = [(axes[0, 0], "train", "loss", "training loss (nats/token)"), (axes[0, 1], "val", "val_loss", val_name),
              (axes[1, 0], "train", "lr", "learning rate"), (axes[1, 1], "train", "tokens_per_sec", "tokens/s")]
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        chain = _chain(run)
        for part in chain:
            last = part is run
            offset = part.offset(x)
            name = part.label + (f" ({part.objective})" if part.objective else "")
            for ax, which, key, _ in panels:
                recs = [r for r in getattr(part, which) if _finite(r.get(key))]
                if not recs:
                    continue
                ax.plot(part.x(recs, x) + offset, [r[key] for r in recs], color=color,
                        linestyle="-" if last else "--", marker="o" if which == "val" or len(recs) == 1 else None,
                        markersize=3,
                        label=name if last or len(chain) == 1 else f"{name}, continued by {run.label}")
            for it in part.resumes():
                at = _x_at(part, it, x) + offset
                for ax, *_ in panels:
                    ax.axvline(at, color=color, linestyle=":", linewidth=1,
                               label=f"{part.label} resumed at its iteration {it}")
    for ax, _which, key, ylabel in panels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
        elif x == "iterations":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if x != "iterations":
            ax.xaxis.set_major_formatter(EngFormatter())
        if reference is not None and key in ("loss", "val_loss"):
            ax.axhline(reference, color="k", linestyle="--", linewidth=1, label=f"{reference_label} {reference:.3f}")
    axes[1, 1].set_ylim(bottom=0)  # throughput from 0: a small change is not a big drop
    axes[1, 1].yaxis.set_major_formatter(EngFormatter())
    handles: dict[str, object] = {}
    for ax, *_ in panels:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle(title or ", ".join(r.label for r in runs)[:120])
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=8, frameon=False)
    rows = (len(handles) + 1) // 2
    fig.tight_layout(rect=(0, min(0.3, 0.03 * rows + 0.02), 1, 1))
    return fig


def _chain(run: RunCurves) -> list[RunCurves]:
    """The runs ``run`` continues, oldest first, then ``run``."""
    chain = [run]
    while chain[0].previous is not None and len(chain) < 20:
        chain.insert(0, chain[0].previous)
    return chain


def _x_at(run: RunCurves, iteration: int, axis: str) -> float:
    """The x of ``iteration`` on ``axis`` (from its start record's tokens, else the nearest record)."""
    if axis == "iterations":
        return float(iteration)
    start = next((r for r in run.starts if r["iteration"] == iteration and r.get("tokens") is not None), None)
    if start is not None:
        tokens = float(start["tokens"])
        return tokens if axis == "tokens" else 6.0 * (run.non_embedding_params or 0) * tokens
    recs = [r for r in run.train + run.val if r["iteration"] == iteration] or [{"iteration": iteration}]
    return float(run.x(recs[:1], axis)[0])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
