"""A small instruction mixture from data that ships with the repo or an installed package.

Task families (one jsonl of ``prompt``/``completion`` records each):

* from ``examples/data/tinyshakespeare.txt.zst`` (public domain; karpathy/char-rnn): ``speaker`` (who speaks a
  line), ``continue`` (the next line of a speech), ``reverse`` (the words of a line in reverse order),
  ``count`` (the number of words of a line), ``last_word`` (the last word of a line);
* from scikit-learn's bundled datasets (BSD-3-Clause package; the UCI data sets it ships): ``iris``
  (species from the four measurements) and ``wine`` (cultivar from four of the thirteen measurements).

The lengths vary from a few tokens (``count``) to a few dozen (``continue``, ``wine``), as in an instruction
mixture. ``python examples/instruction_tuning/tasks.py OUT_DIR [--per-task N]`` writes ``OUT_DIR/{task}.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
TASKS = ("speaker", "continue", "reverse", "count", "last_word", "iris", "wine")


def speeches() -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech of the corpus."""
    import zstandard

    with open(CORPUS, "rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
    out = []
    for block in text.split("\n\n"):
        lines = [x.strip() for x in block.strip().split("\n") if x.strip()]
        if len(lines) >= 2 and lines[0].endswith(":") and len(lines[0]) < 30:
            out.append((lines[0][:-1], lines[1:]))
    return out


def _words(line: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", line)


def shakespeare_tasks(rng: random.Random, per_task: int) -> dict[str, list[dict]]:
    sp = speeches()
    counts: dict[str, int] = {}
    for who, _ in sp:
        counts[who] = counts.get(who, 0) + 1
    top = {w for w, _ in sorted(counts.items(), key=lambda x: -x[1])[:12]}
    lines = [(who, ln) for who, ls in sp for ln in ls if 3 <= len(_words(ln)) <= 12]
    pairs = [(ls[i], ls[i + 1]) for _, ls in sp for i in range(len(ls) - 1)]
    tasks: dict[str, list[dict]] = {t: [] for t in TASKS[:5]}
    for who, ln in rng.sample([x for x in lines if x[0] in top], per_task):
        tasks["speaker"].append({"prompt": f"Who speaks this line? {ln}\nAnswer:", "completion": f" {who}"})
    for a, b in rng.sample(pairs, per_task):
        tasks["continue"].append({"prompt": f"Continue the speech. {a}\nNext line:", "completion": f" {b}"})
    for _, ln in rng.sample(lines, per_task):
        w = _words(ln)
        tasks["reverse"].append({"prompt": f"Reverse the words: {' '.join(w)}\nAnswer:",
                                 "completion": " " + " ".join(reversed(w))})
    for _, ln in rng.sample(lines, per_task):
        tasks["count"].append({"prompt": f"How many words are in: {ln}\nAnswer:", "completion": f" {len(_words(ln))}"})
    for _, ln in rng.sample(lines, per_task):
        tasks["last_word"].append({"prompt": f"What is the last word of: {ln}\nAnswer:",
                                   "completion": f" {_words(ln)[-1]}"})
    return tasks


def sklearn_tasks(rng: random.Random, per_task: int) -> dict[str, list[dict]]:
    from sklearn.datasets import load_iris, load_wine

    out: dict[str, list[dict]] = {}
    for name, loader, cols in (("iris", load_iris, [0, 1, 2, 3]), ("wine", load_wine, [0, 6, 9, 12])):
        ds = loader()
        rows = list(range(len(ds.target)))
        recs = []
        for i in (rng.choice(rows) for _ in range(per_task)):
            feats = ", ".join(f"{ds.feature_names[c].replace('_', ' ')} {ds.data[i, c]:g}" for c in cols)
            recs.append({"prompt": f"Classify the {name}: {feats}.\nClass:",
                         "completion": f" {str(ds.target_names[ds.target[i]]).replace('_', ' ')}"})
        out[name] = recs
    return out


def build(out_dir: str | Path, per_task: int = 200, seed: int = 0) -> dict[str, str]:
    """Write ``{task}.jsonl`` per family; returns ``{task: path}``."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = shakespeare_tasks(rng, per_task) | sklearn_tasks(rng, per_task)
    paths = {}
    for name, recs in tasks.items():
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        paths[name] = str(p)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for task, path in build(a.out_dir, a.per_task, a.seed).items():
        print(task, path)
