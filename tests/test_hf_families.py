"""Model families imported from Hugging Face: logits vs ``transformers`` at TP1, TP2 and PP2, round trips, errors.

Each family (BERT, RoBERTa, XLM-R, Llama 3 with llama3 RoPE scaling, Qwen2 with q/k/v biases and tied
embeddings, Mistral) is a fresh random tiny model made by ``transformers`` and saved with ``save_pretrained``.
``mdm-convert from-hf`` imports it; the reference is the stock HF forward (float32, ``atol=rtol=1e-5``; a wrong
map or a missing piece gives O(1e-2..1) differences). Decoders are imported as ARMs (causal, like the HF
class), encoders as MDMs (bidirectional, like the HF class). The export goes back to the family it came from
and is bitwise equal to the original; the encoder export loads with the stock ``AutoModelForMaskedLM``.

Two gloo jobs serve every test: one process (imports, TP1 logits, exports) and two processes (TP2 for every
family, then PP2 for BERT).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = [pytest.mark.dist]

VOCAB = 96
SEQ = 12
ATOL = RTOL = 1e-5
FAMILIES = ("bert", "roberta", "xlm-roberta", "llama3", "qwen2", "mistral")
ENCODERS = ("bert", "roberta", "xlm-roberta")


# ---- builders (module level: the spawned processes import them) -----------------------------------

def make_tokenizer(out: Path, family: str) -> None:
    """A word-level tokenizer of VOCAB ids with the family's own special tokens (all with a mask token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "bert":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                    "mask_token": "[MASK]"}
    elif family in ("roberta", "xlm-roberta"):
        specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                    "mask_token": "<mask>"}
    else:
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                    "mask_token": "<mask>"}
    names = list(specials.values())
    words = [f"w{i}" for i in range(VOCAB - len(names))]
    vocab = {t: i for i, t in enumerate(names[:-1] + words + names[-1:])}  # mask last, as RoBERTa
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(out))


def make_hf_model(out: Path, family: str, seed: int = 0) -> None:
    """A tiny random ``transformers`` model of ``family`` (every weight and norm randomised), saved."""
    import transformers as tr

    torch.manual_seed(seed)
    enc = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               layer_norm_eps=1e-5)
    dec = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, rms_norm_eps=1e-5)
    if family == "bert":
        model = tr.BertForMaskedLM(tr.BertConfig(max_position_embeddings=SEQ + 4, pad_token_id=0, **enc))
    elif family == "roberta":
        model = tr.RobertaForMaskedLM(tr.RobertaConfig(max_position_embeddings=SEQ + 4, pad_token_id=1,
                                                       type_vocab_size=1, **enc))
    elif family == "xlm-roberta":
        model = tr.XLMRobertaForMaskedLM(tr.XLMRobertaConfig(max_position_embeddings=SEQ + 2, pad_token_id=1, **enc))
    elif family == "llama3":  # original context 32: every wavelength band of the llama3 rule is hit at s = 12
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = tr.LlamaForCausalLM(tr.LlamaConfig(rope_parameters=rope, max_position_embeddings=64,
                                                   tie_word_embeddings=False, **dec))
    elif family == "qwen2":
        model = tr.Qwen2ForCausalLM(tr.Qwen2Config(tie_word_embeddings=True, max_position_embeddings=64,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **dec))
    elif family == "mistral":
        model = tr.MistralForCausalLM(tr.MistralConfig(sliding_window=None, max_position_embeddings=64,
                                                       head_dim=8, **dec))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name.lower() and name.endswith("weight")
            p.copy_((1 + 0.1 * torch.randn_like(p)) if norm else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out))
    make_tokenizer(out, family)


def tokens(family: str) -> torch.Tensor:
    """[2, SEQ] ids; RoBERTa-style rows get a pad token mid-sequence (positions skip it)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, VOCAB - 1, (2, SEQ), generator=g)
    if family in ("roberta", "xlm-roberta"):
        ids[1, 5] = 1
    return ids


def hf_logits(hf_dir: Path, family: str, remote: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if family in ENCODERS or remote else AutoModelForCausalLM
    model = cls.from_pretrained(str(hf_dir), trust_remote_code=remote, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens(family)).logits  # [b, s, vocab]


def import_job(rank: int, world_size: int, base: str) -> dict:
    """One process: import every family, TP1 logits through ``load_megatron_for_inference``, export back."""
    from megatron_mdm import runtime
    from megatron_mdm.config import ParallelConfig
    from megatron_mdm.decoding.backends.megatron import load_megatron_for_inference
    from megatron_mdm.hf import export_to_hf, import_from_hf

    runtime.init_distributed(ParallelConfig(), 2)
    out = {}
    for family in FAMILIES:
        root = Path(base) / family
        import_from_hf(root / "hf", root / "ckpt", objective="mdm" if family in ENCODERS else "arm")
        fn, cfg, tok = load_megatron_for_inference(root / "ckpt")
        out[family] = {"logits": fn(tokens(family))[..., :VOCAB], "mask_id": tok.mask_id,
                       "vocab": tok.vocab_size, "padded": fn(tokens(family)).shape[-1]}
        export_to_hf(root / "ckpt", root / "back")
    return out


def _gather_tp(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _layout_logits(rank: int, ckpt: Path, family: str, tp: int, pp: int):
    """Build the checkpoint's model (config from the checkpoint) at TP/PP, load, forward; last stage's logits."""
    from megatron.core import parallel_state as ps

    from megatron_mdm import runtime
    from megatron_mdm.checkpoint import checkpointing
    from megatron_mdm.config import Config
    from megatron_mdm.models.build import build_model

    meta = checkpointing.load_meta(checkpointing.resolve_checkpoint(ckpt))
    cfg = Config.from_dict(meta["config"])
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    runtime.init_parallel_state(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(5)
    model = build_model(cfg, cfg.model.vocab_size, causal=cfg.objective.objective == "arm")[0]
    checkpointing.load_checkpoint(ckpt, [model], finetune=True)
    model.eval()
    ids = tokens(family)
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        if pp > 1:
            if ps.is_pipeline_first_stage():
                hidden = model(ids, pos, None)  # [s, b, h]
                torch.distributed.send(hidden.contiguous(), dst=rank + 1)
                return None
            hidden = torch.empty(SEQ, ids.shape[0], cfg.model.hidden_size)
            torch.distributed.recv(hidden, src=rank - 1)
            model.set_input_tensor(hidden)
        return _gather_tp(model(ids, pos, None))[..., :VOCAB]


def layouts_job(rank: int, world_size: int, base: str) -> dict:
    """Two processes: TP2 logits of every family, then PP2 logits of BERT."""
    from megatron_mdm import runtime
    from megatron_mdm.config import ParallelConfig

    runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=2), 2)
    out = {f"tp2/{f}": _layout_logits(rank, Path(base) / f / "ckpt", f, 2, 1) for f in FAMILIES}
    out["pp2/bert"] = _layout_logits(rank, Path(base) / "bert" / "ckpt", "bert", 1, 2)
    return out


# ---- the shared fixture --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    for i, family in enumerate(FAMILIES):
        make_hf_model(base / family / "hf", family, seed=i)
    tp1 = run_distributed(import_job, 1, str(base))[0]
    layouts = run_distributed(layouts_job, 2, str(base))
    merged = {**layouts[0], "pp2/bert": layouts[1]["pp2/bert"]}
    return {"base": base, "tp1": tp1, "layouts": merged}


# ---- logits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_hf_tp1(world, family):
    ref = hf_logits(world["base"] / family / "hf", family)
    got = world["tp1"][family]["logits"]
    assert got.shape == ref.shape == (2, SEQ, VOCAB)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("layout", [f"tp2/{f}" for f in FAMILIES] + ["pp2/bert"])
def test_imported_logits_match_hf_tp2_pp2(world, layout):
    family = layout.split("/")[1]
    ref = hf_logits(world["base"] / family / "hf", family)
    torch.testing.assert_close(world["layouts"][layout], ref, atol=ATOL, rtol=RTOL)


# ---- round trip and export -------------------------------------------------------------------------

def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise_and_same_family(world, family):
    a, b = _tensors(world["base"] / family / "hf"), _tensors(world["base"] / family / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca = json.loads((world["base"] / family / "hf" / "config.json").read_text())
    cb = json.loads((world["base"] / family / "back" / "config.json").read_text())
    assert ca["model_type"] == cb["model_type"] and ca["architectures"] == cb["architectures"]
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
              "max_position_embeddings", "tie_word_embeddings", "num_key_value_heads", "type_vocab_size",
              "layer_norm_eps", "rms_norm_eps", "rope_parameters") + (("pad_token_id",) if family in ENCODERS else ()):
        if k in ca:
            assert ca[k] == cb[k], k


@pytest.mark.parametrize("family", ENCODERS)
def test_exported_encoder_loads_with_stock_class(world, family):
    """No remote code: the stock ``AutoModelForMaskedLM`` class, the tokenizer's own mask token."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    back = world["base"] / family / "back"
    assert not (back / "modeling_mdm.py").exists()
    model = AutoModelForMaskedLM.from_pretrained(str(back))  # trust_remote_code defaults to False
    assert type(model).__name__ == json.loads((back / "config.json").read_text())["architectures"][0]
    tok = AutoTokenizer.from_pretrained(str(back))
    assert tok.mask_token in ("[MASK]", "<mask>") and tok.mask_token_id == world["tp1"][family]["mask_id"]
    assert world["tp1"][family]["vocab"] == VOCAB  # the mask token was reused, not added
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens(family)).logits, hf_logits(world["base"] / family / "hf", family))


# ---- RoPE scaling: Megatron's llama3 rule vs transformers' -------------------------------------------

@pytest.mark.parametrize("original, low, high", [(8192, 1.0, 4.0), (32, 1.0, 4.0), (64, 2.0, 8.0)])
def test_llama3_rope_frequencies_match_transformers(original, low, high):
    """(8192, 1, 4): Megatron's own ``rope_scaling`` option; other constants: its rule with all four."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_mdm.config import Config
    from megatron_mdm.models.llama import _rescale_rope, _rope_kwargs

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}
    hf = LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=rope, max_position_embeddings=2 * original)
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    cfg = Config()
    m = cfg.model
    m.rotary_base, m.rope_scaling, m.rope_scaling_factor = 500000, "llama3", 8.0
    m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_position_embeddings = low, high, original
    kw = _rope_kwargs(cfg)
    assert kw["rope_scaling"] == (original == 8192)
    holder = torch.nn.Module()
    holder.rotary_pos_emb = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=500000,
                                            use_cpu_initialization=True, **kw)
    _rescale_rope(holder, cfg)
    assert scale == 1.0
    unscaled = 1.0 / (500000 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert not torch.allclose(ref, unscaled)  # the rule changes some frequencies
    torch.testing.assert_close(holder.rotary_pos_emb.inv_freq, ref, atol=0, rtol=0)


# ---- bad input ------------------------------------------------------------------------------------

def test_unsupported_architecture_names_itself_and_the_supported(tmp_path, capsys):
    from transformers import GPT2Config

    from megatron_mdm.cli.convert import main
    from megatron_mdm.hf import ConversionError, import_from_hf

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, architectures=["GPT2LMHeadModel"]).save_pretrained(str(d))
    with pytest.raises(ConversionError, match="'gpt2' \\(GPT2LMHeadModel\\).*supported model types: bert, eurobert, llama, "
                                              "mdm_llama, mistral, qwen2, roberta, xlm-roberta"):
        import_from_hf(d, tmp_path / "out")
    assert main(["from-hf", "--hf", str(d), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mdm-convert: error:") and "gpt2" in err and "qwen2" in err and "\n" not in err


def test_unsupported_rope_and_activation(tmp_path):
    from megatron_mdm.hf import ConversionError, family_for_hf

    llama = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 32, "num_hidden_layers": 1,
             "intermediate_size": 8, "vocab_size": 10, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
    with pytest.raises(ConversionError, match="'yarn' is not supported \\(supported: default, llama3\\)"):
        family_for_hf(llama).config_from_hf(llama)
    bert = {"model_type": "bert", "hidden_act": "gelu_new", "num_attention_heads": 4, "hidden_size": 32}
    with pytest.raises(ConversionError, match="hidden_act 'gelu_new'"):
        family_for_hf(bert).config_from_hf(bert)


def test_encoder_refuses_arm_objective(world, tmp_path):
    from megatron_mdm.hf import ConversionError, import_from_hf

    with pytest.raises(ConversionError, match="--objective arm: a BERT masked LM"):
        import_from_hf(world["base"] / "bert" / "hf", tmp_path / "x", objective="arm")
