"""IsoFLOP plans: from FLOP budgets and model shapes to the list of runs, written as YAML or JSON.

Compute is counted as the scaling paper does, C = 6·N·D, with N the non-embedding parameters
(``megatron_mdm.models.flops.count_parameters``) and D the training tokens. For a budget C and a shape of N
parameters, D = C / (6·N) and the run trains ``iters = round(D / (global_batch_size * seq_length))``
steps; the planned compute 6·N·iters·gbs·seq must lie within ``tolerance`` (default 5 %) of C, else
the shape is left out of that budget (too few steps to hit it) and the plan says so.

Shapes are named presets (``megatron_mdm.presets``: the SMDM family, ``tiny``, ``quickstart``, ...) or
come from a depth/width rule for sizes between them (:func:`rule_shape`): ``layers = round(hidden /
aspect)`` (or a given depth, ``LAYERSxHIDDEN``), heads of ``head_dim`` dims, SwiGLU width 8/3·hidden
rounded up to a multiple of 32. With aspect 32 and head_dim 32 the rule gives ``tiny`` (64 wide,
2 layers) and ``quickstart`` (128, 4), up to their FFN width and KV groups.

Each budget gets either every shape whose run is feasible, or (``per_budget=K``) the K shapes nearest
in log N to the guess N ≈ sqrt(C / (6·ratio)) (``ratio`` tokens per parameter, Chinchilla's ~20), so
that its IsoFLOP curve brackets the minimum.

A plan can hold several groups of runs (``mdm-sweep plan --append``): e.g. the ARM at smaller budgets than
the MDM, or variants of some runs with their own extra flags (``--tag seed2 --run-args "--seed 2"``, a
learning-rate check with ``--run-args "--lr 1e-2"``). A variant's run is named with its tag,
``<objective>-C<budget>-<shape>-<tag>``; the fit uses the untagged runs and reports the variants beside.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_mdm.errors import UserError

PLAN_VERSION = 1
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")


class PlanError(UserError, ValueError):
    """An impossible or inconsistent plan request, or an unreadable plan file; the message says which."""


@dataclass
class Shape:
    """A model shape: a name and the ModelConfig fields that define it."""

    name: str
    model: dict

    @property
    def flags(self) -> list[str]:
        return [x for k, v in self.model.items() if v is not None for x in ("--" + k.replace("_", "-"), str(v))]


@dataclass
class Run:
    """One training run of a plan.

    Attributes:
        name: unique directory name, ``<objective>-C<budget>-<shape>``.
        objective: ``mdm`` or ``arm``.
        budget: the IsoFLOP budget C this run belongs to (FLOPs).
        shape: shape name; model: its ModelConfig fields.
        non_embedding_params: N.
        iters: optimizer steps; tokens: D = iters · global_batch_size · seq_length.
        flops: 6·N·D, the run's planned compute; budget_error: flops / budget - 1.
        tag: '' for the main grid, else the variant's name (seed or learning-rate checks).
        run_args: extra training flags of this run (after the plan's ``train_args``, so they win).
    """

    name: str
    objective: str
    budget: float
    shape: str
    model: dict
    non_embedding_params: int
    iters: int
    tokens: int
    flops: float
    budget_error: float
    tag: str = ""
    run_args: list[str] = field(default_factory=list)

    @property
    def cost(self) -> float:
        """Relative training time on a CPU: steps x (1 + N / 55k), the per-step time of these tiny models
        measured on the 2-core development machine (12 ms at N = 4k, 33 ms at N = 107k)."""
        return self.iters * (1.0 + self.non_embedding_params / 55_000)


@dataclass
class Plan:
    """A sweep: the common recipe and the runs (``to_dict``/``from_dict`` round-trip through YAML/JSON).

    Attributes:
        budgets: FLOP budgets C.
        objectives: e.g. ``["mdm", "arm"]``.
        seq_length, global_batch_size, micro_batch_size: the same for every run.
        config: base recipe YAML passed as ``--config`` (None: defaults).
        train_args: extra pretrain_mdm.py flags for every run (data, tokenizer, lr, eval settings, ...).
        runs: the runs, budget by budget, smallest shape first.
        skipped: ``{budget, shape, reason}`` for shapes left out of a budget.
    """

    budgets: list[float]
    objectives: list[str]
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    config: str | None = None
    train_args: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "Plan":
        try:
            if int(d.get("version", 0)) != PLAN_VERSION:
                raise PlanError(f"{source}: plan version {d.get('version')!r}, expected {PLAN_VERSION}")
            runs = [Run(**r) for r in d["runs"]]
            kw = {k: v for k, v in d.items() if k not in ("runs", "version")}
            plan = cls(**kw, runs=runs)
        except (KeyError, TypeError) as e:
            raise PlanError(f"{source}: not a sweep plan ({e})") from None
        names = [r.name for r in plan.runs]
        if len(set(names)) != len(names):
            raise PlanError(f"{source}: duplicate run names")
        return plan

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (``.json``) or YAML (anything else)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        if path.suffix == ".json":
            path.write_text(json.dumps(d, indent=1) + "\n", encoding="utf-8")
        else:
            import yaml

            path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: no such plan file (write one with `mdm-sweep plan`)")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
        if not isinstance(d, dict):
            raise PlanError(f"{path}: not a sweep plan")
        return cls.from_dict(d, source=str(path))

    def extend(self, other: "Plan") -> "Plan":
        """This plan with ``other``'s runs added (``mdm-sweep plan --append``); the common recipe must agree.

        Raises:
            PlanError: a different recipe (sequence length, batch, config, train args) or a run name twice.
        """
        for key in ("seq_length", "global_batch_size", "micro_batch_size", "config", "train_args"):
            if getattr(self, key) != getattr(other, key):
                raise PlanError(f"--append: {key} {getattr(other, key)!r} differs from the plan's {getattr(self, key)!r}")
        names = {r.name for r in self.runs}
        twice = [r.name for r in other.runs if r.name in names]
        if twice:
            raise PlanError(f"--append: the plan already has {', '.join(twice[:3])}" + (" ..." if len(twice) > 3 else "")
                            + " (give the new runs a --tag)")
        self.budgets = sorted(set(self.budgets) | set(other.budgets))
        self.objectives = list(dict.fromkeys(self.objectives + other.objectives))
        self.runs = self.runs + other.runs
        self.skipped = self.skipped + other.skipped
        return self

    def check_curves(self) -> None:
        """Every (objective, budget, tag) of the plan has at least 3 shapes (an IsoFLOP curve); PlanError."""
        groups: dict[tuple, set] = {}
        for r in self.runs:
            groups.setdefault((r.objective, r.budget, r.tag), set()).add(r.shape)
        thin = [f"{o} at {c:.3g}" + (f" ({t})" if t else "") + f": {len(s)}" for (o, c, t), s in groups.items()
                if len(s) < 3]
        if thin:
            raise PlanError("an IsoFLOP curve needs 3 shapes; the plan has fewer for " + "; ".join(thin))

    def partition(self, parts: int) -> list[list[str]]:
        """The run names split into ``parts`` lists of about equal :attr:`Run.cost` (largest first, each to the
        lightest list), for as many launches side by side."""
        if parts < 1:
            raise PlanError("--part: the number of parts must be positive")
        lists: list[list[str]] = [[] for _ in range(parts)]
        load = [0.0] * parts
        for r in sorted(self.runs, key=lambda r: -r.cost):
            k = load.index(min(load))
            lists[k].append(r.name)
            load[k] += r.cost
        return lists


# ---- shapes ----------------------------------------------------------------------------------------


def preset_shape(name: str) -> Shape:
    from megatron_mdm.presets import get_preset

    try:
        p = get_preset(name)
    except ValueError as e:
        raise PlanError(str(e)) from None
    return Shape(name, {k: p.get(k) for k in MODEL_KEYS})


def rule_shape(hidden: int, aspect: float = 32.0, head_dim: int = 32, ffn_multiple: int = 32,
               layers: int | None = None) -> Shape:
    """The depth/width rule: ``round(hidden / aspect)`` layers (at least 1) unless ``layers`` is given,
    ``hidden / head_dim`` heads (multi-head attention), SwiGLU width ceil(8/3·hidden / ffn_multiple)·ffn_multiple.
    Named ``w<hidden>`` (rule depth) or ``<layers>x<hidden>``."""
    if hidden <= 0 or hidden % head_dim:
        raise PlanError(f"hidden size {hidden} is not a positive multiple of --head-dim {head_dim}")
    if layers is not None and layers <= 0:
        raise PlanError(f"shape {layers}x{hidden}: the number of layers must be positive")
    n_layers = layers if layers is not None else max(1, round(hidden / aspect))
    ffn = math.ceil(8 * hidden / 3 / ffn_multiple) * ffn_multiple
    heads = hidden // head_dim
    return Shape(f"w{hidden}" if layers is None else f"{layers}x{hidden}",
                 {"num_layers": n_layers, "hidden_size": hidden, "num_attention_heads": heads,
                  "num_query_groups": heads, "ffn_hidden_size": ffn})


def parse_shape(text: str, head_dim: int = 32) -> Shape:
    """``LAYERSxHIDDEN`` (e.g. ``2x64``) -> the rule's shape with that depth."""
    try:
        layers, hidden = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise PlanError(f"--shapes: {text!r} is not LAYERSxHIDDEN (e.g. 2x64)") from None
    return rule_shape(hidden, head_dim=head_dim, layers=layers)


def shape_params(shape: Shape) -> int:
    """N (non-embedding parameters) of a shape, by ``megatron_mdm.models.flops.count_parameters``."""
    import warnings

    from megatron_mdm.config import Config

    with warnings.catch_warnings():  # megatron-core's "Apex / TE not installed" notes on import
        warnings.simplefilter("ignore")
        from megatron_mdm.models.flops import count_parameters

    cfg = Config()
    for k, v in shape.model.items():
        setattr(cfg.model, k, v)
    return count_parameters(cfg, 0)["non_embedding"]


# ---- planning --------------------------------------------------------------------------------------


def budget_label(c: float) -> str:
    """A compact, unique-enough label of a FLOP budget: 3e+12 -> '3e12', 1.5e13 -> '1.5e13'."""
    mant, exp = f"{c:.3g}".split("e") if "e" in f"{c:.3g}" else (f"{c:.3g}", "0")
    return f"{mant}e{int(exp)}"


def make_plan(budgets: list[float], shapes: list[Shape], objectives: list[str], seq_length: int,
              global_batch_size: int, micro_batch_size: int | None = None, config: str | None = None,
              train_args: list[str] | None = None, per_budget: int | None = None, ratio: float = 20.0,
              min_iters: int = 10, tolerance: float = 0.05, tag: str = "", run_args: list[str] | None = None,
              min_shapes: int = 3) -> Plan:
    """The IsoFLOP runs of every (budget, shape, objective); see the module docstring. ``min_shapes`` (3: an
    IsoFLOP curve) is the fewest feasible shapes a budget may have; a group that adds shapes to another
    group's budgets (``--append``) may have fewer, and :meth:`Plan.check_curves` checks the whole plan.

    Raises:
        PlanError: no budgets/shapes/objectives, a bad value, or a budget that no shape can hit.
    """
    if not budgets or any(not (c > 0) for c in budgets):
        raise PlanError("--budgets: give one or more positive FLOP budgets")
    if not shapes:
        raise PlanError("give model shapes: --presets, --widths and/or --shapes")
    bad = [o for o in objectives if o not in ("mdm", "arm")]
    if not objectives or bad:
        raise PlanError(f"--objectives: expected mdm and/or arm, got {objectives}")
    if seq_length <= 0 or global_batch_size <= 0:
        raise PlanError("--seq-length and --global-batch-size must be positive")
    mbs = micro_batch_size or global_batch_size
    if global_batch_size % mbs:
        raise PlanError(f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size {mbs}")
    if per_budget is not None and per_budget < 3:
        raise PlanError("--per-budget: an IsoFLOP parabola needs at least 3 sizes")
    if not 0 < tolerance < 1:
        raise PlanError("--tolerance must be in (0, 1)")
    if tag and not all(ch.isalnum() or ch in "._-" for ch in tag):
        raise PlanError(f"--tag {tag!r}: use letters, digits, '.', '_' and '-' (it becomes part of directory names)")
    names = [s.name for s in shapes]
    if len(set(names)) != len(names):
        raise PlanError(f"duplicate shapes: {names}")
    sized = sorted(((shape_params(s), s) for s in shapes), key=lambda t: t[0])
    tokens_per_step = global_batch_size * seq_length
    runs: list[Run] = []
    skipped: list[dict] = []
    for c in sorted(budgets):
        feasible = []
        for n, s in sized:
            iters = round(c / (6 * n * tokens_per_step))
            flops = 6.0 * n * iters * tokens_per_step
            err = flops / c - 1
            if iters < min_iters:
                skipped.append({"budget": c, "shape": s.name, "reason": f"{iters} steps < --min-iters {min_iters}"})
            elif abs(err) > tolerance:
                skipped.append({"budget": c, "shape": s.name,
                                "reason": f"{iters} steps give {err:+.1%} of the budget (> {tolerance:.0%})"})
            else:
                feasible.append((n, s, iters, flops, err))
        if per_budget is not None and len(feasible) > per_budget:
            guess = math.log(math.sqrt(c / (6 * ratio)))
            best = min(range(len(feasible) - per_budget + 1),
                       key=lambda i: abs(sum(math.log(f[0]) for f in feasible[i:i + per_budget]) / per_budget - guess))
            for f in feasible[:best] + feasible[best + per_budget:]:
                skipped.append({"budget": c, "shape": f[1].name, "reason": "outside the --per-budget window"})
            feasible = feasible[best:best + per_budget]
        if len(feasible) < min_shapes or not feasible:
            raise PlanError(f"budget {c:.3g}: only {len(feasible)} shape(s) can hit it within {tolerance:.0%} with "
                            f">= {min_iters} steps (need 3 for an IsoFLOP curve); add shapes or change the budget")
        for obj in objectives:
            for n, s, iters, flops, err in feasible:
                runs.append(Run(name=f"{obj}-C{budget_label(c)}-{s.name}" + (f"-{tag}" if tag else ""), objective=obj,
                                budget=float(c), shape=s.name, model=dict(s.model), non_embedding_params=int(n),
                                iters=int(iters), tokens=int(iters * tokens_per_step), flops=float(flops),
                                budget_error=float(err), tag=tag, run_args=list(run_args or [])))
    return Plan(budgets=[float(c) for c in sorted(budgets)], objectives=list(objectives), seq_length=seq_length,
                global_batch_size=global_batch_size, micro_batch_size=mbs, config=config,
                train_args=list(train_args or []), runs=runs, skipped=skipped)


def describe(plan: Plan) -> str:
    """A table of the plan's runs, for the terminal."""
    lines = [f"{len(plan.runs)} runs: {len(plan.budgets)} budgets x {', '.join(plan.objectives)}; "
             f"{plan.global_batch_size} x {plan.seq_length} tokens per step",
             f"{'run':<34} {'N':>10} {'iters':>7} {'tokens':>12} {'C=6ND':>10} {'vs budget':>9}"]
    for r in plan.runs:
        lines.append(f"{r.name:<34} {r.non_embedding_params:>10,} {r.iters:>7} {r.tokens:>12,} {r.flops:>10.3g} "
                     f"{r.budget_error:>+9.1%}" + (f"  {' '.join(r.run_args)}" if r.run_args else ""))
    for s in plan.skipped:
        lines.append(f"  left out: budget {s['budget']:.3g}, {s['shape']}: {s['reason']}")
    return "\n".join(lines)
