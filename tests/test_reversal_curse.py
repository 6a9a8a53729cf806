"""The reversal-curse example: scoring code against hand-made references, data pairing, a smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "examples" / "reversal_curse" / "run.py"
DATA_CANDIDATES = [REPO.parent / "shared" / "data" / "reversal_curse", Path("/work/shared/data/reversal_curse")]
DATA = next((d for d in DATA_CANDIDATES if (d / "p2d_prompts_test.jsonl").is_file()), None)
needs_data = pytest.mark.skipif(DATA is None, reason="reversal-curse data directory (../shared/data) absent")


def _load_run():
    spec = importlib.util.spec_from_file_location("reversal_curse_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


rc = _load_run()

V, MASK, EOS = 12, 0, 3


class CharTok:
    """Hand-made tokenizer: one id per character of a tiny alphabet (ids 4..11)."""

    alphabet = "abcdefgh"
    mask_id, eos_id, vocab_size = MASK, EOS, V

    def encode(self, text: str) -> list[int]:
        return [4 + self.alphabet.index(ch) for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i - 4] if i >= 4 else "" for i in ids)


def _answer_of(prompt: list[int]) -> list[int]:
    """The fake model's belief: the answer to a prompt is its first two ids, reversed."""
    return [prompt[1], prompt[0]]


def fake_mdm(prompt_len: int):
    """Bidirectional fake: at completion position j it strongly prefers answer[j], then EOS."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape
        logits = torch.zeros(b, s, V + 4)  # padded vocabulary
        for r in range(b):
            ans = _answer_of(x[r, :prompt_len].tolist())
            for j in range(prompt_len, s):
                k = j - prompt_len
                logits[r, j, ans[k] if k < len(ans) else EOS] = 8.0
        return logits

    return fn


def fake_arm(x: torch.Tensor) -> torch.Tensor:
    """Causal fake with prompts of length 3: logits at position i predict x[i+1]."""
    b, s = x.shape
    logits = torch.zeros(b, s, V + 4)
    for r in range(b):
        ans = _answer_of(x[r, :3].tolist()) + [EOS]
        for i in range(2, s):
            k = i - 2
            logits[r, i, ans[k] if k < len(ans) else EOS] = 8.0
    return logits


# ---- metrics ----------------------------------------------------------------------------------------


def test_exact_match_rules():
    assert rc.is_exact_match(" Uriah Hawthorne", " Uriah Hawthorne")
    assert rc.is_exact_match("Uriah  Hawthorne.", " Uriah Hawthorne")
    assert rc.is_exact_match(" Uriah Hawthorne now enjoys a quiet life.", " Uriah Hawthorne")
    assert not rc.is_exact_match(" Uriah Hawthornes", " Uriah Hawthorne")
    assert not rc.is_exact_match(" Uriah", " Uriah Hawthorne")
    assert not rc.is_exact_match("", " Uriah Hawthorne")
    # the gold's final '.' (descriptions end with '."."') is optional in the generation
    gold = ' the composer of "Abyssal Melodies.".'
    assert rc.is_exact_match(' the composer of "Abyssal Melodies."', gold)
    assert rc.is_exact_match(' the composer of "Abyssal Melodies.".', gold)


def test_smdm_contains_rule():
    """SMDM's evaluate_reverse.py: the stripped, lower-cased gold occurs anywhere in the generation."""
    assert rc.contains_match(" The composer is Uriah Hawthorne!", " Uriah Hawthorne")
    assert rc.contains_match("uriah hawthorne", " Uriah Hawthorne ")
    assert rc.contains_match(" Uriah Hawthornes", " Uriah Hawthorne")  # stricter prefix rule says no
    assert not rc.is_exact_match(" Uriah Hawthornes", " Uriah Hawthorne")
    assert not rc.contains_match(" Uriah Hawthrone", " Uriah Hawthorne")


def test_rank_and_group_rank_by_hand():
    scores = [-3.0, -1.0, -2.0, -1.0, -5.0]
    assert rc.rank_of(scores, 1) == 2  # tied with index 3: ties count against the gold
    assert rc.rank_of(scores, 2) == 3  # -1 and -1 beat -2
    assert rc.rank_of(scores, 4) == 5
    assert rc.rank_of([-1.0, -2.0], 0) == 1
    groups = ["a", "a", "b", "c", "c"]
    # best per group: a -1, b -2, c -1 ; gold index 0 is in group a
    assert rc.group_rank(scores, groups, 0) == 2  # c ties a
    assert rc.group_rank(scores, groups, 2) == 3
    assert rc.group_rank([-1.0, -9.0, -2.0], ["a", "a", "b"], 1) == 1  # own group's best paraphrase counts


# ---- generation and likelihood with fakes -----------------------------------------------------------


def test_ar_loglik_matches_manual_sum():
    torch.manual_seed(0)
    table = torch.randn(V + 4, V + 4)

    def bigram(x):  # causal: logits at i depend on x[i] only
        return table[x]

    prompt, comps = [4, 5, 6], [[7, 8], [9], [10, 11, 3]]
    got = rc.ar_loglik(bigram, prompt, comps, vocab_size=V, batch_size=2)
    for c, g in zip(comps, got):
        seq, ref = prompt + c, 0.0
        for j in range(len(prompt), len(seq)):
            ref += float(torch.log_softmax(table[seq[j - 1], :V].double(), -1)[seq[j]])
        assert math.isclose(g, ref, rel_tol=1e-9, abs_tol=1e-9)


def test_ar_greedy_generate_follows_fake_and_stops_at_eos():
    prompts = [[4, 5, 6], [7, 8, 9], [10, 4, 4]]
    out = rc.ar_greedy_generate(fake_arm, prompts, gen_length=5, eos_id=EOS, vocab_size=V)
    assert out == [[5, 4], [8, 7], [4, 10]]


def test_mdm_scores_batched_equals_library_per_candidate():
    torch.manual_seed(1)
    w = torch.randn(V + 4, V + 4) * 0.5

    def mixer(x):  # bidirectional toy: every position sees the sum of all embeddings
        e = torch.nn.functional.one_hot(x, V + 4).float()
        return e @ w + e.sum(1, keepdim=True) @ w * 0.3

    prompt, comps = [4, 5, 6], [[7, 8], [9], [10, 11, 4], [5]]
    fast = rc.mdm_scores(mixer, prompt, comps, 5, MASK, EOS, V, num_samples=6, seed=7, method="mc", batch_size=5)
    slow = rc.mdm_scores(mixer, prompt, comps, 5, MASK, EOS, V, num_samples=6, seed=7, method="mc-loop")
    assert fast == pytest.approx(slow, rel=1e-9, abs=1e-9)
    chain = rc.mdm_scores(mixer, prompt, comps, 5, MASK, EOS, V, num_samples=6, seed=7, method="chain")
    assert all(c <= 0 for c in chain)


def _toy_set(name="d2p_prompts_test"):
    prompts = ["abc", "bad", "cab", "dhe"]
    golds = ["ba", "ab", "ac", "hd"]
    cands = ["ba", "ab", "ac", "hd", "gg"]
    return rc.TestSet(name, prompts, golds, cands, [cands.index(g) for g in golds], list(cands))


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_evaluate_perfect_fake_scores_100(objective):
    ts = _toy_set()
    fn = fake_mdm(3) if objective == "mdm" else fake_arm
    ts.indices = [3, 5, 8, 9]
    ts.groups = ["p", "p", "q", "r", "s"]  # the first two candidates are one person's
    [row] = rc.evaluate(fn, objective, CharTok(), [ts], mc_samples=4, cfg_scales=(0.0, 0.8), log=lambda *a: None)
    assert row["exact_match"] == 100.0 and row["top1"] == 100.0 and row["mean_rank"] == 1.0
    assert row["contains"] == 100.0
    assert row["num_candidates"] == 5 and row["n"] == 4 and row["gen_length"] == 2 + rc.GEN_EXTRA
    # the MDM generates once per guidance scale (the fake's prompt-free half favours nothing it may emit);
    # the ARM once, without guidance
    assert set(row["by_cfg"]) == ({"0.0", "0.8"} if objective == "mdm" else {"0.0"})
    assert all(v == {"exact_match": 100.0, "contains": 100.0} for v in row["by_cfg"].values())
    recs = row["records"]
    assert [r["index"] for r in recs] == [3, 5, 8, 9] and [r["person"] for r in recs] == ["p", "p", "q", "r"]
    assert all(r["rank"] == 1 and r["person_rank"] == 1 and r["num_candidates"] == 5 for r in recs)
    assert [r["generated"]["0.0"] for r in recs] == ts.golds and all(r["contains"]["0.0"] for r in recs)


def test_evaluate_wrong_fake_scores_0():
    ts = _toy_set()
    ts.golds = ["hd", "hd", "hd", "gg"]  # the fake answers otherwise
    ts.gold_index = [ts.candidates.index(g) for g in ts.golds]
    [row] = rc.evaluate(fake_arm, "arm", CharTok(), [ts], log=lambda *a: None)
    assert row["exact_match"] == 0.0 and row["top1"] == 0.0 and row["mean_rank"] > 1.0


def test_format_table_has_a_row_per_result():
    rows = [{"model": "mdm", "test_file": "p2d_prompts_test", "direction": "same", "n": 4, "exact_match": 25.0,
             "contains": 50.0, "by_cfg": {"0.0": {"contains": 50.0}, "0.8": {"contains": 75.0}},
             "top1": 50.0, "mean_rank": 1.75, "num_candidates": 130, "person_top1": 75.0,
             "person_mean_rank": 1.25, "num_people": 30},
            {"model": "arm", "test_file": "p2d_prompts_test", "direction": "same", "n": 4, "exact_match": 0.0,
             "contains": 0.0, "by_cfg": {"0.0": {"contains": 0.0}}, "top1": 0.0, "mean_rank": 3.0,
             "num_candidates": 130, "person_top1": 0.0, "person_mean_rank": 2.0, "num_people": 30}]
    t = rc.format_table(rows)
    assert "| MDM | p2d_prompts_test | same | 4 | 25.0 | 50.0 | 75.0 (w=0.8) | 50.0 | 1.75 | 130 | 75.0 | 1.25 | 30 |" in t
    assert "| ARM | p2d_prompts_test | same | 4 | 0.0 | 0.0 | — | 0.0 | 3.00 | 130 | 0.0 | 2.00 | 30 |" in t


# ---- the report over seeds ---------------------------------------------------------------------------------


def _report():
    spec = importlib.util.spec_from_file_location("reversal_curse_report", RUN.with_name("report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records(model, seed, ranks_of, people, hits_of=lambda who: False):
    return [{"seed": seed, "model": model, "file": "p2d_reverse_prompts_test", "index": 10 * i + k, "person": who,
             "rank": ranks_of(who, k), "person_rank": ranks_of(who, k), "num_candidates": 30,
             "exact": {"0.0": hits_of(who)}, "contains": {"0.0": hits_of(who)}}
            for i, who in enumerate(people) for k in range(10)]


def test_report_clusters_by_person_and_pairs_models(tmp_path):
    """Per-seed means; the person-clustered interval of a mean against its normal-theory width (200 people,
    per-person means independent); the paired Wilcoxon p of 10 people all better for the MDM against the
    exact 2 / 2^10; the markdown and figure written from the JSONL files."""
    report = _report()
    rng = np.random.default_rng(0)
    people = [f"p{i}" for i in range(200)]
    level = {who: rng.uniform(1, 30) for who in people}
    recs = _records("mdm", 1, lambda who, k: int(level[who]) + k % 2, people) + \
        _records("mdm", 2, lambda who, k: int(level[who]) + 1, people)
    s = report.summarise(recs)
    [r] = [x for x in s["results"] if (x["model"], x["metric"]) == ("mdm", "rank")]
    seed1 = np.mean([int(level[w]) + k % 2 for w in people for k in range(10)])
    assert r["per_seed"] == pytest.approx({1: seed1, 2: np.mean([int(level[w]) + 1 for w in people])})
    per_person = np.array([int(level[w]) + 0.75 for w in people])  # 10 prompts x 2 seeds averaged
    half = 1.96 * per_person.std(ddof=1) / math.sqrt(len(people))
    assert r["ci"][0] == pytest.approx(per_person.mean() - half, abs=0.1 * half)
    assert r["ci"][1] == pytest.approx(per_person.mean() + half, abs=0.1 * half)
    ten = people[:10]
    recs = _records("mdm", 1, lambda who, k: 2, ten, lambda who: True) + \
        _records("arm", 1, lambda who, k: 3 + ten.index(who), ten)
    s = report.summarise(recs)
    [pr] = [p for p in s["paired"] if p["metric"] == "rank"]
    assert pr["mdm_minus_arm"] == pytest.approx(-np.mean([1 + i for i in range(10)]))
    assert pr["wilcoxon_p"] == pytest.approx(2 / 2 ** 10) and pr["mdm_lower"] == 10
    [m] = [p for p in s["paired"] if p["metric"] == "match_w0"]
    assert m["mdm_minus_arm"] == 100.0 and m["ci"] == [100.0, 100.0]
    files = []
    for seed in (1, 2):
        f = tmp_path / f"seed{seed}.jsonl"
        f.write_text("".join(json.dumps(dict(r, seed=seed)) + "\n" for r in recs))
        files.append(str(f))
    args = files + ["--markdown", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json")]
    if importlib.util.find_spec("matplotlib"):
        args += ["--figure", str(tmp_path / "f.png")]
    assert report.main(args) == 0
    md = (tmp_path / "s.md").read_text()
    assert "| MDM | p2d_reverse_prompts_test | reverse: description -> name | 100 |" in md
    assert "Seeds 1, 2" in md


# ---- data files ---------------------------------------------------------------------------------------


def test_missing_data_dir_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--data-dir"):
        rc.resolve_data_dir(tmp_path / "nope")


@needs_data
def test_candidate_sets_and_direction_pairing():
    sets = {n: rc.load_test_set(DATA, n) for n in rc.TEST_FILES}
    for n, ts in sets.items():
        raw = [json.loads(line) for line in (DATA / f"{n}.jsonl").read_text().splitlines() if line.strip()]
        assert ts.prompts == [r["prompt"] for r in raw]
        assert set(ts.candidates) == {r["completion"] for r in raw} and len(ts.candidates) == len(set(ts.candidates))
        assert all(ts.candidates[i] == g for i, g in zip(ts.gold_index, ts.golds))
        assert len(set(ts.groups)) == 30
    names = lambda n: {c.strip() for c in sets[n].candidates}  # noqa: E731
    # the name files: p2d people asked in reverse, d2p people asked in the trained direction
    assert len(names("p2d_reverse_prompts_test")) == 30 and len(names("d2p_prompts_test")) == 30
    assert not names("p2d_reverse_prompts_test") & names("d2p_prompts_test")
    # the description files name exactly the people of the paired name file, one person per description
    assert set(sets["p2d_prompts_test"].groups) == names("p2d_reverse_prompts_test")
    assert set(sets["d2p_reverse_prompts_test"].groups) == names("d2p_prompts_test")
    # p2d people are trained name -> description: their names appear in p2d train prompts
    p2d_train = (DATA / "p2d_prompts_train.jsonl").read_text()
    assert all(n in p2d_train for n in names("p2d_reverse_prompts_test"))
    # same-direction vs reverse labels
    assert {n: ts.direction for n, ts in sets.items()} == {
        "p2d_prompts_test": "same", "d2p_prompts_test": "same",
        "p2d_reverse_prompts_test": "reverse", "d2p_reverse_prompts_test": "reverse"}
    sub = rc.load_test_set(DATA, "d2p_prompts_test", max_test=7, seed=3)
    assert len(sub.prompts) == 7 and sub.candidates == sets["d2p_prompts_test"].candidates
    assert sub.prompts == rc.load_test_set(DATA, "d2p_prompts_test", max_test=7, seed=3).prompts


# ---- learning curves -----------------------------------------------------------------------------------


def test_checkpoint_iterations_lists_complete_checkpoints(tmp_path):
    for it, complete in ((10, True), (5, True), (20, False)):
        d = tmp_path / f"iter_{it:07d}"
        d.mkdir()
        if complete:
            (d / "metadata.json").write_text("{}")
    (tmp_path / "iter_notanumber").mkdir()
    assert rc.checkpoint_iterations(tmp_path) == [5, 10]


def test_learning_curve_picture(tmp_path):
    pytest.importorskip("matplotlib")
    for m in ("mdm", "arm"):
        (tmp_path / m).mkdir()
        (tmp_path / m / "metrics.jsonl").write_text("".join(
            json.dumps({"iteration": i, "loss": 3.0 / i}) + "\n" for i in (10, 20, 30)))
    rows = [{"model": m, "direction": d, "iteration": i, "top1": 10.0 * i / 10, "mean_rank": 15 - i / 10}
            for m in ("mdm", "arm") for d in ("same", "reverse") for i in (10, 20, 30)]
    png = rc.plot_learning_curves(rows, tmp_path, ["mdm", "arm"], tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_data
def test_smoke_run_writes_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(RUN), "--data-dir", str(DATA), "--output", str(tmp_path / "out"), "--preset", "tiny",
           "--steps", "5", "--max-test", "4", "--mc-samples", "2", "--vocab-size", "600", "--global-batch-size", "8",
           "--curve-interval", "5", "--curve-max-test", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(x["model"], x["test_file"]) for x in res["results"]} == {
        (m, n) for m in ("mdm", "arm") for n in rc.TEST_FILES}
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.count("| MDM |") == 4 and md.count("| ARM |") == 4
    recs = [json.loads(x) for x in (tmp_path / "out" / "per_prompt.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 4 * 4 and {r["model"] for r in recs} == {"mdm", "arm"}
    assert all(set(r["contains"]) == ({"0.0", "0.8"} if r["model"] == "mdm" else {"0.0"}) for r in recs)
    curves = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert {(x["model"], x["test_file"], x["iteration"]) for x in curves} == {
        (m, n, 5) for m in ("mdm", "arm") for n in rc.CURVE_FILES}
    assert all(x["n"] == 2 and x["num_candidates"] == 30 for x in curves)
