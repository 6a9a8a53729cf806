"""Adapting imported models: shifted objective, attention annealing, architecture from the checkpoint, export.

References: a float64 loop over positions for the shifted ELBO; the formula of the annealed mask
regenerated from a same-seeded generator; Megatron's own ``DotProductAttention`` for the arbitrary mask; the
causal-spec model for the annealed model at step 0; an uninterrupted run for the resumed one; the HF export
of the same checkpoint for the Megatron inference path.

One gloo process serves the training tests: it imports a tiny random Qwen2 (q/k/v biases, tied
embeddings, GQA) as an MDM, finetunes it 20 steps with ``--shift-logits --attention-anneal-iters 8`` and no
model flag, then resumes from step 10 in a second run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed
from tests.test_hf_families import SEQ, make_hf_model

# ---- the shifted objective -----------------------------------------------------------------------


def test_shifted_objective_equals_float64_reference():
    """loss = sum_b sum_{i >= 1, masked} -log softmax(logits[b, i - 1])[x0[b, i]] / t_b / (B (S - 1))."""
    from megatron_mdm.config import ObjectiveConfig
    from megatron_mdm.objective import MDMObjective, mask_generator

    b, s, v, mask_id = 4, 10, 13, 12
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    x0 = torch.randint(0, mask_id, (b, s), generator=g)
    logits = torch.randn(b, s, v, generator=g, dtype=torch.float64)
    obj = MDMObjective(ObjectiveConfig(shift_logits=True, random_length_prob=0.0), mask_id, 11)
    batch = obj.prepare(x0, None, mask_generator(3, 7, 1))
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, v), batch.labels.reshape(-1),
                                                  reduction="none").view(b, s)
    loss_sum, n = obj.loss(batch, per_token)
    ref = 0.0
    for r in range(b):
        for i in range(1, s):
            if batch.inputs[r, i] == mask_id:
                ref += -torch.log_softmax(logits[r, i - 1], -1)[x0[r, i]].item() / batch.t[r].item()
    assert (batch.inputs[:, 0] == x0[:, 0]).all()  # position 0 is context
    assert int(n) == b * (s - 1)
    assert math.isclose(loss_sum.item() / int(n), ref / (b * (s - 1)), rel_tol=1e-6)


def test_position_zero_is_never_masked_and_aligned_logits():
    from megatron_mdm.config import ObjectiveConfig
    from megatron_mdm.objective import MDMObjective, aligned_logits_fn, mask_generator, shift_logits

    obj = MDMObjective(ObjectiveConfig(shift_logits=True, eps=0.99, random_length_prob=0.0), 9, 8)
    x0 = torch.randint(0, 8, (64, 6))
    batch = obj.prepare(x0, None, mask_generator(0, 0, 0))
    assert not (batch.inputs[:, 0] == 9).any() and (batch.inputs[:, 1:] == 9).float().mean() > 0.9
    raw = torch.randn(2, 5, 3)
    out = aligned_logits_fn(lambda ids: raw, True)(torch.zeros(2, 5, dtype=torch.long))
    assert torch.equal(out[:, 1:], raw[:, :-1]) and torch.equal(out[:, 0], raw[:, 0])
    assert torch.equal(shift_logits(raw), out) and aligned_logits_fn(len, False) is len


# ---- attention annealing -------------------------------------------------------------------------


def test_anneal_schedule_and_mask_formula():
    from megatron_mdm.objective import anneal_generator, anneal_ratio, annealed_attention_mask

    n, s = 8, 32
    assert [anneal_ratio(k, n) for k in (0, 2, 8, 50)] == [0.0, 0.25, 1.0, 1.0]
    causal_out = torch.ones(s, s, dtype=torch.bool).triu(1)
    assert torch.equal(annealed_attention_mask(s, 0.0, anneal_generator(1, 0, 0))[0, 0], causal_out)
    assert annealed_attention_mask(s, anneal_ratio(n, n), anneal_generator(1, n, 0)) is None
    for k in (2, 5):
        r = anneal_ratio(k, n)
        got = annealed_attention_mask(s, r, anneal_generator(1, k, 3))[0, 0]
        u = torch.rand(s, s, generator=anneal_generator(1, k, 3))
        assert torch.equal(got, ~((torch.arange(s)[None] <= torch.arange(s)[:, None]) | (u < r)))
        above = ~got[causal_out]  # attended pairs above the diagonal: about r of them
        assert abs(above.float().mean().item() - r) < 0.08
        assert not got.diagonal().any()


def test_training_batches_carry_the_schedule():
    """What ``prepared_batches`` gives the model: causal at step 0, random in between, none after the anneal;
    middle pipeline stages (``stage_masks``) draw the same masks; validation never anneals."""
    from megatron_mdm.config import ObjectiveConfig
    from megatron_mdm.objective import build_objective
    from megatron_mdm.training.loop import prepared_batches, stage_masks

    obj = build_objective(ObjectiveConfig(attention_anneal_iters=4, random_length_prob=0.0), 9, 8)
    raw = iter(lambda: {"tokens": torch.randint(0, 8, (2, 6))}, None)
    masks = {k: [b.attention_mask for b in prepared_batches(obj, raw, 3, 5, k, 1, torch.device("cpu"))]
             for k in (0, 2, 4)}
    assert all(torch.equal(m[0, 0], torch.ones(6, 6, dtype=torch.bool).triu(1)) for m in masks[0])
    assert not torch.equal(masks[2][0], masks[2][1])  # one draw per micro-batch
    assert masks[4] == [None, None, None]
    middle = list(stage_masks(obj, 3, 6, 5, 2, 1, torch.device("cpu")))
    assert all(torch.equal(a, b) for a, b in zip(middle, masks[2]))


def anneal_model_job(rank: int, world_size: int) -> dict:
    """SDPA with an arbitrary mask vs Megatron's DotProductAttention; the annealed model vs causal/no-mask specs."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_mdm import runtime
    from megatron_mdm.config import Config
    from megatron_mdm.models.attention import SDPAttention
    from megatron_mdm.models.build import build_model, transformer_config
    from megatron_mdm.objective import anneal_generator, annealed_attention_mask

    cfg = Config()
    cfg.model.num_query_groups = 2
    cfg.data.seq_length = 12
    cfg.objective.attention_anneal_iters = 10
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(1)
    out = {}
    tconf = transformer_config(cfg, use_te=False)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(12, 2, n, 16, generator=g) for n in (4, 2, 2))
    mask = annealed_attention_mask(12, 0.4, anneal_generator(0, 4, 0))
    ours = SDPAttention(tconf, 1, AttnMaskType.arbitrary, "self")
    ref = DotProductAttention(tconf, 1, AttnMaskType.arbitrary, "self")
    out["core_err"] = (ours(q, k, v, mask) - ref(q, k, v, mask)).abs().max().item()
    ids = torch.randint(0, 90, (2, 12), generator=g)
    pos = torch.arange(12)[None].expand(2, -1)
    logits = {}
    for name, causal, anneal in (("annealed", False, 10), ("causal", True, 0), ("mdm", False, 0)):
        cfg.objective.attention_anneal_iters = anneal
        runtime.set_seed(9)  # the same weights for the three specs
        model = build_model(cfg, 100, causal)[0].eval()
        with torch.no_grad():
            if name == "annealed":
                logits["step0"] = model(ids, pos, annealed_attention_mask(12, 0.0, None))
                logits["after"] = model(ids, pos, annealed_attention_mask(12, 1.0, None))  # None
                logits["between"] = model(ids, pos, mask)
            else:
                logits[name] = model(ids, pos, None)
    out["step0_vs_causal"] = (logits["step0"] - logits["causal"]).abs().max().item()
    out["after_vs_mdm"] = (logits["after"] - logits["mdm"]).abs().max().item()
    out["between_vs_causal"] = (logits["between"] - logits["causal"]).abs().max().item()
    out["between_vs_mdm"] = (logits["between"] - logits["mdm"]).abs().max().item()
    return out


@pytest.mark.dist
def test_annealed_attention_in_the_model():
    r = run_distributed(anneal_model_job, 1)[0]
    assert r["core_err"] < 1e-6
    assert r["step0_vs_causal"] < 1e-6 and r["after_vs_mdm"] < 1e-6
    assert r["between_vs_causal"] > 1e-3 and r["between_vs_mdm"] > 1e-3


# ---- architecture from the checkpoint --------------------------------------------------------------

def _cfg(flags: list[str]):
    from megatron_mdm.config import add_arguments, from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    return from_args(p.parse_args(flags))


def _fake_checkpoint(root: Path, **model) -> Path:
    from megatron_mdm.checkpoint import integrity
    from megatron_mdm.config import Config

    cfg = Config()
    for k, v in model.items():
        setattr(cfg.model, k, v)
    it = root / "iter_0000004"
    it.mkdir(parents=True)
    (it / "config.yaml").write_text(cfg.to_yaml())
    integrity.write_manifest(it, integrity.hash_files(it, ["config.yaml"]))  # its config.yaml is verified first
    (root / "latest_checkpointed_iteration.txt").write_text("4\n")
    return it


def test_architecture_comes_from_the_checkpoint(tmp_path):
    from megatron_mdm.config import ConfigError

    _fake_checkpoint(tmp_path / "ck", architecture="bert", num_layers=3, hidden_size=48, num_attention_heads=3,
                     ffn_hidden_size=96, max_position_embeddings=130, num_tokentypes=1, position_padding_idx=1,
                     norm_epsilon=1e-12, vocab_size=77, untie_embeddings_and_output_weights=False)
    cfg = _cfg(["--load", str(tmp_path / "ck"), "--finetune", "--fp8-recipe", "tensorwise"])
    m = cfg.model
    assert (m.architecture, m.num_layers, m.hidden_size, m.num_attention_heads, m.max_position_embeddings,
            m.position_padding_idx, m.norm_epsilon, m.vocab_size) == ("bert", 3, 48, 3, 130, 1, 1e-12, 77)
    assert not m.untie_embeddings_and_output_weights and m.fp8_recipe == "tensorwise"  # free fields stay free
    cfg.validate()
    same = _cfg(["--load", str(tmp_path / "ck"), "--num-layers", "3", "--norm-epsilon", "1e-12"])
    assert same.model.num_layers == 3  # an agreeing flag is fine
    with pytest.raises(ConfigError, match=r"^--hidden-size: 64 \(from the command line\) differs from the "
                                          r"checkpoint .*ck \(48\)"):
        _cfg(["--load", str(tmp_path / "ck"), "--finetune", "--hidden-size", "64"])
    yml = tmp_path / "c.yaml"
    yml.write_text("model:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"^--num-layers: 2 \(from --config .*c.yaml\) differs"):
        _cfg(["--config", str(yml), "--load", str(tmp_path / "ck")])
    with pytest.raises(ConfigError, match=r"^--num-layers: 2 \(from --preset tiny\) differs"):
        _cfg(["--preset", "tiny", "--load", str(tmp_path / "ck")])
    assert _cfg(["--load", str(tmp_path / "nothing")]).model.num_layers == 2  # the loader reports it later


def test_option_validation_names_the_flag():
    from megatron_mdm.config import Config, ConfigError

    cases = [({"objective": {"objective": "arm", "shift_logits": True}}, "--shift-logits: needs --objective mdm"),
             ({"objective": {"attention_anneal_iters": -1}}, "--attention-anneal-iters: must be >= 0"),
             ({"model": {"architecture": "bert", "rope_scaling": "llama3"}}, "--rope-scaling: needs --architecture llama"),
             ({"model": {"architecture": "bert", "max_position_embeddings": 64}, "data": {"seq_length": 128}},
              "--seq-length: 128 positions"),
             ({"model": {"position_padding_idx": 1}}, "--position-padding-idx: needs --architecture bert")]
    for d, msg in cases:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("+", r"\+")):
            Config.from_dict(d).validate()


# ---- training from an imported model ---------------------------------------------------------------

def adapt_train_job(rank: int, world_size: int, base: str) -> dict:
    """Import Qwen2 as an MDM; finetune 20 steps (shift + annealing, no model flag); resume from step 10."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from synthetic import SyntheticLoader

    from megatron_mdm import runtime
    from megatron_mdm.decoding.backends.megatron import load_megatron_for_inference
    from megatron_mdm.hf import import_from_hf
    from megatron_mdm.tokenization import MDMTokenizer
    from megatron_mdm.training.loop import Trainer

    base = Path(base)
    import_from_hf(base / "hf", base / "ckpt0", objective="mdm")
    tok = MDMTokenizer.load(base / "hf")
    common = ["--tokenizer", str(base / "hf"), "--seq-length", str(SEQ), "--micro-batch-size", "4",
              "--global-batch-size", "8", "--lr", "1e-2", "--min-lr", "1e-3", "--lr-warmup-iters", "2",
              "--log-interval", "1", "--random-length-prob", "0", "--train-iters", "20", "--t-sampling", "antithetic",
              "--shift-logits", "--attention-anneal-iters", "8"]

    def run(flags: list[str]) -> tuple[dict, object]:
        cfg = _cfg(common + flags)
        cfg.validate(world_size=1)
        runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
        loader = SyntheticLoader(tok.mask_id, SEQ, 4, num_samples=4, seed=3, low=5)  # 4 sequences to learn
        trainer = Trainer(cfg, tok.vocab_size, tok.mask_id, tok.pad_id, loader, tokenizer_dir=str(base / "hf"))
        try:
            trainer.load()
            return trainer.train(), cfg
        finally:
            destroy_num_microbatches_calculator()

    full, cfg = run(["--load", str(base / "ckpt0"), "--finetune", "--save", str(base / "run"), "--save-interval", "10"])
    resumed, _ = run(["--load", str(base / "run"), "--ckpt-iteration", "10", "--save", str(base / "run2")])
    fn, _, _ = load_megatron_for_inference(base / "run")
    ids = torch.randint(5, tok.mask_id, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ids[:, 4:8] = tok.mask_id
    m = cfg.model
    return {"full": full["losses"], "resumed": resumed["losses"], "ids": ids, "logits": fn(ids)[..., :tok.vocab_size],
            "arch": (m.hf_model_type, m.add_qkv_bias, m.num_query_groups, m.untie_embeddings_and_output_weights)}


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    base = tmp_path_factory.mktemp("adapt")
    make_hf_model(base / "hf", "qwen2", seed=11)
    return base, run_distributed(adapt_train_job, 1, str(base))[0]


@pytest.mark.dist
def test_finetune_from_import_lowers_loss_and_resumes_exactly(adapted):
    _, r = adapted
    assert r["arch"] == ("qwen2", True, 2, False)  # from the checkpoint, no model flag given
    full = r["full"]
    assert len(full) == 20 and all(math.isfinite(x) for x in full)
    # deterministic on CPU (seeded data, masks and t); measured 4.48 -> 3.17 nats (ratio 0.71)
    assert sum(full[-5:]) / 5 < 0.85 * sum(full[:5]) / 5
    assert r["resumed"] == full[10:]  # bit-exact, annealed masks included


@pytest.mark.dist
def test_shifted_export_matches_megatron(adapted, tmp_path):
    """The HF export (``MDMForMaskedLM`` with q/k/v biases and the shift) == the Megatron inference logits,
    and its logits are the raw network's shifted by one."""
    from transformers import AutoModelForMaskedLM

    from megatron_mdm.hf import export_to_hf

    base, r = adapted
    out = export_to_hf(base / "run", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shift_logits"] is True and cfg["qkv_bias"] is True and cfg["model_type"] == "mdm_llama"
    model = AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True).eval()
    with torch.no_grad():
        hf = model(r["ids"]).logits
        model.config.shift_logits = False
        raw = model(r["ids"]).logits
    torch.testing.assert_close(hf, r["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(hf[:, 1:], raw[:, :-1])


# ---- export into an existing directory (issue 10, item 6) -----------------------------------------

@pytest.mark.dist
def test_export_never_mixes_files(adapted, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    from megatron_mdm.cli.convert import main
    from megatron_mdm.hf import ConversionError, export_to_hf

    base, _ = adapted
    out = tmp_path / "hf"
    export_to_hf(base / "run", out, iteration=10, shard_size="20KB")  # sharded
    assert (out / "model.safetensors.index.json").is_file()
    export_to_hf(base / "run", out, iteration=20)  # the same run: replaced whole, one file
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not any(n.startswith("model-0") or n.endswith("index.json") for n in names)
    assert json.loads((out / "mdm_export.json").read_text())["iteration"] == 20
    fresh = export_to_hf(base / "run", tmp_path / "fresh", iteration=20)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(fresh / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True)
    assert not list(tmp_path.glob(".hf.*"))  # no partial or old directory left beside it
    # a directory of something else: refused without --force, nothing touched; replaced with it
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="--output: .*mine is not empty and is not an export"):
        export_to_hf(base / "run", other)
    assert (other / "notes.txt").read_text() == "keep me"
    assert main(["to-hf", "--load", str(base / "run2"), "--output", str(out)]) == 2  # another run's export
    assert "is an export of" in capsys.readouterr().err
    assert main(["to-hf", "--load", str(base / "run"), "--output", str(other), "--force"]) == 0
    assert not (other / "notes.txt").exists() and (other / "model.safetensors").is_file()
    shutil.rmtree(other)


@pytest.mark.dist
@pytest.mark.slow
def test_annealed_training_interleaved_pipeline_matches_single_process(tmp_path):
    """PP=2 x 2 virtual stages: the chunks without data (middle stages) get the same annealed masks."""
    from tests.jobs import train_job

    base = {"num_layers": 4, "train_iters": 3, "attention_anneal_iters": 4}
    init = str(tmp_path / "init")
    run_distributed(train_job, 1, dict(base, train_iters=0, save=init))
    base.update(load=init, finetune=True)
    ref = run_distributed(train_job, 1, base)[0]
    vpp = run_distributed(train_job, 2, dict(base, pipeline_model_parallel_size=2,
                                             num_layers_per_virtual_pipeline_stage=1))
    for r in vpp:
        torch.testing.assert_close(r["losses"], ref["losses"], rtol=1e-5, atol=1e-6)


def test_tokenizer_keeps_its_mask_token_or_adds_one_with_a_warning(tmp_path, caplog):
    import logging

    from megatron_mdm.tokenization import MDMTokenizer
    from tests.test_hf_convert import make_tokenizer as make_plain_tokenizer
    from tests.test_hf_families import VOCAB, make_tokenizer

    make_tokenizer(tmp_path / "bert", "bert")
    make_tokenizer(tmp_path / "roberta", "roberta")
    with caplog.at_level(logging.INFO, logger="megatron_mdm.tokenization"):
        bert, roberta = MDMTokenizer.load(tmp_path / "bert"), MDMTokenizer.load(tmp_path / "roberta")
    assert not caplog.records  # nothing added
    assert bert.vocab_size == roberta.vocab_size == VOCAB
    assert bert.hf.convert_ids_to_tokens(bert.mask_id) == "[MASK]" and bert.eos_id == bert.hf.sep_token_id
    assert roberta.hf.convert_ids_to_tokens(roberta.mask_id) == "<mask>"
    make_plain_tokenizer(tmp_path / "plain", with_mask=False)
    with caplog.at_level(logging.INFO, logger="megatron_mdm.tokenization"):
        plain = MDMTokenizer.load(tmp_path / "plain")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"no mask token: id {plain.mask_id} is new" in warned[0].getMessage()
    assert plain.hf.convert_ids_to_tokens(plain.mask_id) == "<|mask|>"
