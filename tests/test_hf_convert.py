"""Hugging Face conversion: Megatron (TP=2, PP=2) forward vs the exported HF forward, HF round trip, errors.

References are independent of the conversion code: the Megatron logits come from Megatron-core's own
forward on the sharded model (gathered over TP, taken from the last PP stage); the HF logits from
``transformers`` loading the exported directory. Tolerance: float32, ``atol=rtol=1e-5`` (measured
differences are ~1e-7; a wrong map gives O(1)). The round trip HF -> Megatron -> HF is bitwise.

One module fixture runs the three process groups (TP2, PP2, one-process import/inference) once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = [pytest.mark.dist]

VOCAB = 100
ATOL = RTOL = 1e-5


# ---- builders (module level: the spawned processes import them) -----------------------------------

def make_tokenizer(out: Path, with_mask: bool = True) -> None:
    """A word-level tokenizer of VOCAB ids with <|mask|> (optional), <|pad|>, <|eos|>, <|unk|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|mask|>", "<|pad|>", "<|eos|>", "<|unk|>"] if with_mask else ["<|pad|>", "<|eos|>", "<|unk|>"]
    words = [f"w{i}" for i in range(VOCAB - len(specials))]  # VOCAB ids either way
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"mask_token": "<|mask|>"} if with_mask else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>",
                                 unk_token="<|unk|>", **kw)
    hf.save_pretrained(str(out))


def make_cfg(objective: str, tp: int = 1, pp: int = 1):
    from megatron_mdm.config import Config

    cfg = Config()
    cfg.model.num_query_groups = 2
    cfg.model.make_vocab_size_divisible_by = 16  # 100 -> 112 (TP1), 128 (TP2): padding exists
    cfg.model.vocab_size = VOCAB
    cfg.data.seq_length = 16
    cfg.objective.objective = objective
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    return cfg


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 16), generator=g)  # [b, s]


def save_and_forward(rank: int, world_size: int, root: str, tok_dir: str, tp: int, pp: int) -> dict:
    """Build MDM and ARM models at TP/PP, save each, return the full logits [b, s, padded] of each."""
    from megatron.core import parallel_state as ps

    from megatron_mdm import runtime
    from megatron_mdm.checkpoint import checkpointing
    from megatron_mdm.models.build import build_model

    runtime.init_distributed(make_cfg("mdm", tp, pp).parallel, 2)
    out = {}
    for seed, objective in enumerate(("mdm", "arm")):
        cfg = make_cfg(objective, tp, pp)
        runtime.set_seed(1000 + seed)
        model = build_model(cfg, VOCAB, causal=objective == "arm")[0]
        g = torch.Generator().manual_seed(seed)  # the same on every rank: norms are TP-replicated
        with torch.no_grad():  # non-trivial norms, so a swapped norm map shows in the logits
            for name, p in model.named_parameters():
                if "layernorm" in name:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        checkpointing.save_checkpoint(Path(root) / objective, 3, [model], None, None,
                                      {"config": cfg.to_dict(), "consumed_samples": 0},
                                      tokenizer_dir=tok_dir, config_yaml=cfg.to_yaml())
        model.eval()
        ids = tokens()
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        with torch.no_grad():
            if pp > 1:
                if ps.is_pipeline_first_stage():
                    hidden = model(ids, pos, None)  # [s, b, h]
                    torch.distributed.send(hidden.contiguous(), dst=rank + 1)
                    continue
                hidden = torch.empty(ids.shape[1], ids.shape[0], cfg.model.hidden_size)
                torch.distributed.recv(hidden, src=rank - 1)
                model.set_input_tensor(hidden)
            logits = model(ids, pos, None)  # [b, s, padded / tp]
            if tp > 1:
                parts = [torch.empty_like(logits) for _ in range(tp)]
                torch.distributed.all_gather(parts, logits, group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(parts, dim=-1)
        out[objective] = logits
    return out


def import_and_infer(rank: int, world_size: int, jobs: dict) -> dict:
    """One process: HF -> Megatron imports, then ``load_megatron_for_inference`` logits."""
    from megatron_mdm import runtime
    from megatron_mdm.config import ParallelConfig
    from megatron_mdm.decoding.backends.megatron import load_megatron_for_inference
    from megatron_mdm.hf import import_from_hf

    runtime.init_distributed(ParallelConfig(), 2)
    for hf_dir, out_dir, objective in jobs["imports"]:
        import_from_hf(hf_dir, out_dir, objective=objective)
    logits = {}
    for name, ckpt in jobs["infer"].items():
        fn, _, tok = load_megatron_for_inference(ckpt)
        logits[name] = (fn(tokens())[..., :VOCAB], tok.mask_id if tok is not None else None)
    return logits


def make_hf_llama(out: Path, with_mask: bool = True) -> None:
    """A tiny random GQA ``LlamaForCausalLM`` (4 heads, 2 kv groups) saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(str(out))
    make_tokenizer(out, with_mask=with_mask)


# ---- the shared fixture --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("hfconv")
    tok_dir = base / "tok"
    make_tokenizer(tok_dir)
    tp_logits = run_distributed(save_and_forward, 2, str(base / "tp2"), str(tok_dir), 2, 1)[0]
    pp_logits = run_distributed(save_and_forward, 2, str(base / "pp2"), str(tok_dir), 1, 2)[1]
    make_hf_llama(base / "llama")
    make_hf_llama(base / "llama_nomask", with_mask=False)
    jobs = {
        "imports": [(str(base / "llama"), str(base / "imported"), "arm"),
                    (str(base / "llama_nomask"), str(base / "imported_nomask"), "mdm")],
        "infer": {"tp2_mdm": str(base / "tp2" / "mdm"), "imported": str(base / "imported")},
    }
    infer = run_distributed(import_and_infer, 1, jobs)[0]
    return {"base": base, "tp2": tp_logits, "pp2": pp_logits, "infer": infer}


def _hf_logits(hf_dir: Path, mdm: bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if mdm else AutoModelForCausalLM
    model = cls.from_pretrained(str(hf_dir), trust_remote_code=mdm).eval()
    with torch.no_grad():
        return model(tokens()).logits  # [b, s, vocab]


# ---- (1) parity: Megatron TP=2 / PP=2 vs exported HF ----------------------------------------------

@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_megatron_vs_exported_hf_logits(world, layout, objective, tmp_path):
    from megatron_mdm.hf import export_to_hf

    out = export_to_hf(world["base"] / layout / objective, tmp_path / "hf", shard_size="40KB")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == (["MDMForMaskedLM"] if objective == "mdm" else ["LlamaForCausalLM"])
    assert (out / "model.safetensors.index.json").is_file()  # sharded at 40KB
    hf = _hf_logits(out, mdm=objective == "mdm")
    meg = world[layout][objective]
    assert meg.shape[-1] > VOCAB  # vocabulary padding existed and was trimmed by the export
    assert hf.shape == (2, 16, VOCAB)
    torch.testing.assert_close(hf, meg[..., :VOCAB], atol=ATOL, rtol=RTOL)


def test_export_directory_contents(world, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from megatron_mdm.hf import export_to_hf

    out = export_to_hf(world["base"] / "tp2" / "mdm", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mask_token_id"] == tok.mask_token_id == 0
    assert json.loads((out / "generation_config.json").read_text())["mask_token_id"] == 0
    readme = (out / "README.md").read_text()
    assert "model.generate(" in readme and "Mask token id" in readme and "`mdm`" in readme
    assert (out / "model.safetensors").is_file() and (out / "modeling_mdm.py").is_file()
    base = AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert type(base).__name__ == "MDMModel"
    assert "megatron_mdm" not in (out / "configuration_mdm.py").read_text().split('"""', 2)[2]  # stands alone
    # modeling_mdm.py imports the project only as the fallback inside the package (the export has the files)
    code = (out / "modeling_mdm.py").read_text().split('"""', 2)[2]
    assert code.count("from megatron_mdm") == 1 and 'if not __name__.startswith("megatron_mdm."):' in code


# ---- (3) bidirectional ----------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_exported_attention_direction(world, objective, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from megatron_mdm.hf import export_to_hf

    out = export_to_hf(world["base"] / "tp2" / objective, tmp_path / "hf")
    mdm = objective == "mdm"
    cls = AutoModelForMaskedLM if mdm else AutoModelForCausalLM
    model = cls.from_pretrained(str(out), trust_remote_code=mdm).eval()
    a = tokens()
    b = a.clone()
    b[:, -1] = (b[:, -1] + 1) % VOCAB
    with torch.no_grad():
        changed = (model(a).logits[:, 0] - model(b).logits[:, 0]).abs().max().item()
    assert (changed > 1e-4) if mdm else (changed == 0.0)


# ---- (2) round trip and import ------------------------------------------------------------------

def _hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def test_round_trip_hf_megatron_hf_is_bitwise(world, tmp_path):
    from megatron_mdm.hf import export_to_hf

    out = export_to_hf(world["base"] / "imported", tmp_path / "back")
    a, b = _hf_tensors(world["base"] / "llama"), _hf_tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca = json.loads((world["base"] / "llama" / "config.json").read_text())
    cb = json.loads((out / "config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert ca[k] == cb[k], k


def test_imported_megatron_matches_hf_llama(world):
    meg, _ = world["infer"]["imported"]
    ref = _hf_logits(world["base"] / "llama", mdm=False)
    torch.testing.assert_close(meg, ref, atol=ATOL, rtol=RTOL)


def test_inference_helper_matches_export(world, tmp_path):
    """``load_megatron_for_inference`` on a TP2 checkpoint (one process, TP1) == exported HF logits."""
    from megatron_mdm.hf import export_to_hf

    meg, mask_id = world["infer"]["tp2_mdm"]
    hf = _hf_logits(export_to_hf(world["base"] / "tp2" / "mdm", tmp_path / "hf"), mdm=True)
    torch.testing.assert_close(meg, hf, atol=ATOL, rtol=RTOL)
    assert mask_id == 0


def test_import_adds_mask_token_row(world, tmp_path):
    from megatron_mdm.hf import export_to_hf
    from megatron_mdm.tokenization import MDMTokenizer

    out = export_to_hf(world["base"] / "imported_nomask", tmp_path / "hf")
    tok = MDMTokenizer.load(out)
    assert tok.vocab_size == VOCAB + 1 and tok.mask_id == VOCAB
    orig, new = _hf_tensors(world["base"] / "llama_nomask"), _hf_tensors(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[name].shape[0] == VOCAB + 1
        assert torch.equal(new[name][:VOCAB], orig[name])
        torch.testing.assert_close(new[name][VOCAB], orig[name].mean(0))
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == VOCAB


# ---- (4) clear errors ---------------------------------------------------------------------------

def test_missing_iteration_and_checkpoint(world, tmp_path):
    from megatron_mdm.hf import ConversionError, export_to_hf

    with pytest.raises(ConversionError, match="iteration 99"):
        export_to_hf(world["base"] / "tp2" / "mdm", tmp_path / "x", iteration=99)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no complete checkpoint"):
        export_to_hf(tmp_path / "empty", tmp_path / "x")


def test_checkpoint_of_another_architecture(world, tmp_path):
    import torch.distributed.checkpoint as dcp

    from megatron_mdm.checkpoint.integrity import verification
    from megatron_mdm.hf import ConversionError, export_to_hf, read_checkpoint_tensors

    src = world["base"] / "tp2" / "mdm" / "iter_0000003"
    # (a) extra tensors (learned absolute positions, GPT-2 style)
    gpt = tmp_path / "gpt" / "iter_0000001"
    sd = read_checkpoint_tensors(src)
    sd["embedding.position_embeddings.weight"] = torch.zeros(16, 64)
    gpt.mkdir(parents=True)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(gpt)), no_dist=True)
    for f in ("metadata.json", "common.pt"):
        shutil.copy2(src / f, gpt / f)
    with verification(allow_unverified=True), pytest.raises(ConversionError, match="another architecture"):
        export_to_hf(gpt, tmp_path / "x")  # written by hand: no checksums
    # (b) a config whose shapes do not fit the tensors
    wide = tmp_path / "wide" / "iter_0000001"
    shutil.copytree(src, wide)
    common = torch.load(wide / "common.pt", weights_only=False)
    common["meta"]["config"]["model"]["hidden_size"] = 128
    torch.save(common, wide / "common.pt")
    (wide / "checksums.json").unlink()  # edited by hand: the checksums would (rightly) refuse it
    with verification(allow_unverified=True), pytest.raises(ConversionError, match="linear_qkv|shape"):
        export_to_hf(wide, tmp_path / "y")


def test_hf_model_not_llama_shaped(tmp_path, capsys):
    from transformers import GPT2Config

    from megatron_mdm.cli.convert import main
    from megatron_mdm.hf import ConversionError, import_from_hf

    d = tmp_path / "gpt2"
    d.mkdir()
    GPT2Config(n_layer=2, n_embd=64, n_head=4).save_pretrained(str(d))
    with pytest.raises(ConversionError, match="'gpt2'.*not a supported family"):
        import_from_hf(d, tmp_path / "out")
    assert main(["from-hf", "--hf", str(d), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mdm-convert: error:") and "gpt2" in err and "\n" not in err and "Traceback" not in err
    assert main(["to-hf", "--load", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_to_hf(world, tmp_path, capsys):
    from megatron_mdm.cli.convert import main
    from megatron_mdm.hf import export_to_hf, import_from_hf

    assert main(["to-hf", "--load", str(world["base"] / "pp2" / "arm"), "--iteration", "3",
                 "--output", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    assert "mdm-convert to-hf" not in capsys.readouterr().err  # no bars when stderr is not a terminal
    # progress (what the CLI shows on a terminal): the stages and the bytes read or written, on stderr
    export_to_hf(world["base"] / "pp2" / "arm", tmp_path / "hf2", iteration=3, shard_size="20KB", progress=True)
    err = capsys.readouterr().err
    assert "mdm-convert to-hf: 4/4 [" in err and ", done" in err and "writing safetensors" in err
    assert len(list((tmp_path / "hf2").glob("model-*.safetensors"))) > 1
    import_from_hf(tmp_path / "hf2", tmp_path / "back", progress=True)
    err = capsys.readouterr().err
    assert "mdm-convert from-hf: 3/3 [" in err and ", done" in err and "reading weights" in err


# ---- generation: the Megatron and HF paths give identical samples in deterministic mode -----------

GEN_KW = {"gen_length": 8, "steps": 8, "block_length": 4, "temperature": 0.0,
          "remasking": "low_confidence"}


def megatron_generate(rank: int, world_size: int, ckpt: str, prompts: list, cfg_scale: float) -> list:
    from megatron_mdm.decoding.backends.megatron import load_megatron_for_inference
    from megatron_mdm.decoding.loop import generate

    logits_fn, cfg, tok = load_megatron_for_inference(ckpt)
    out = generate(logits_fn, prompts, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                   eos_id=None, cfg_scale=cfg_scale, **GEN_KW)
    return out.tokens.tolist()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_hf_and_megatron_generate_identical_samples(world, tmp_path, cfg_scale):
    from megatron_mdm.decoding.loop import generate
    from megatron_mdm.evaluation.loading import load_logits_fn
    from megatron_mdm.hf import export_to_hf

    ckpt = world["base"] / "tp2" / "mdm"
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**30, (1,))))
    prompts = [torch.randint(5, 60, (4,), generator=g).tolist() for _ in range(3)]
    meg = run_distributed(megatron_generate, 1, str(ckpt), prompts, cfg_scale)[0]
    logits_fn, tok, mask_id, vocab = load_logits_fn(str(export_to_hf(ckpt, tmp_path / "hf")))
    hf = generate(logits_fn, prompts, mask_id=mask_id, vocab_size=vocab, eos_id=None,
                  cfg_scale=cfg_scale, **GEN_KW).tokens.tolist()
    assert hf == meg
    for row, p in zip(hf, prompts):
        assert row[: len(p)] == p and mask_id not in row
