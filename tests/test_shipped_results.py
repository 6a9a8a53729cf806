"""The raw results shipped in docs/results reproduce the numbers the docs quote.

* scaling: ``mdm-sweep fit`` on ``docs/results/scaling/results.csv`` (the bootstrap settings recorded in
  ``fit.json``) gives ``fit.json`` again, and docs/SCALING.md quotes its summary verbatim;
* reversal curse: ``report.py`` on the shipped per-prompt results gives the shipped summary, which
  docs/REVERSAL_CURSE.md quotes.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCALING = REPO / "docs" / "results" / "scaling"
RC = REPO / "docs" / "results" / "reversal_curse"


def _close(a, b, path="fit") -> None:
    """Every number of two JSON trees equal to 1e-6 (relative), every other leaf equal."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("name", ["fit.json", "fit_full.json"])
def test_scaling_doc_quotes_the_shipped_fit(name):
    from megatron_mdm.sweep.fit import summary

    fit = json.loads((SCALING / name).read_text())
    doc = (REPO / "docs" / "SCALING.md").read_text()
    assert summary(fit) in doc, f"docs/SCALING.md does not quote the summary of {name} (bash examples/scaling/redraw.sh)"


@pytest.mark.slow
@pytest.mark.parametrize("name,flops", [("fit.json", "6nd"), ("fit_full.json", "full")])
def test_scaling_fit_reproduces_from_the_shipped_csv(name, flops):
    from megatron_mdm.sweep.collect import read_csv
    from megatron_mdm.sweep.fit import fit_sweep

    shipped = json.loads((SCALING / name).read_text())
    again = fit_sweep(read_csv(SCALING / "results.csv"), bootstrap=shipped["bootstrap"], seed=shipped["seed"],
                      flops=flops)
    _close(json.loads(json.dumps(again)), shipped)


def test_reversal_curse_summary_reproduces_from_the_per_prompt_results():
    """One file per seed, each with both models and every prompt of the four test files; report.py on them
    gives the shipped summary, which docs/REVERSAL_CURSE.md quotes (its first line names the seeds shipped)."""
    spec = importlib.util.spec_from_file_location("rc_report", REPO / "examples" / "reversal_curse" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    files = sorted(RC.glob("seed*.jsonl.gz"))
    assert files, "per-prompt results are shipped as docs/results/reversal_curse/seed<N>.jsonl.gz"
    recs = report.read_records(files)
    counts = Counter((r["seed"], r["model"], r["file"]) for r in recs)
    seeds = sorted({r["seed"] for r in recs})
    assert {f.name for f in files} == {f"seed{x}.jsonl.gz" for x in seeds}, "one file per seed, named by its seed"
    assert set(counts) == {(x, m, f) for x in seeds for m in ("mdm", "arm") for f in report.FILES}
    assert set(counts.values()) == {300}, "every prompt of each test file, once"
    s = report.summarise(recs)
    assert s["seeds"] == seeds
    md = report.markdown(s)
    assert md == (RC / "summary.md").read_text()
    assert md in (REPO / "docs" / "REVERSAL_CURSE.md").read_text()
