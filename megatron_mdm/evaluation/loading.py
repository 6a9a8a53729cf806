"""Load a Hugging Face model directory as a model-agnostic ``LogitsFn``, running no code it ships unasked.

* Our own exports (``mdm-convert to-hf``: ``model_type`` ``eurobert`` or ``mdm_llama`` with our
  ``MDMForMaskedLM``) load with this package's classes (``hf.modeling.load_model``), never with the
  ``modeling_mdm.py`` copy in the directory.
* Any bidirectional masked LM that transformers knows (``AutoModelForMaskedLM``, e.g. a BERT) loads as is.
* A directory that asks for its own Python code (``auto_map`` in ``config.json`` or
  ``tokenizer_config.json``) is refused unless ``trust_remote_code`` is given (``--trust-remote-code``).
* ``--model`` is a local directory; a name that does not exist locally but looks like a hub id
  (``org/name``) is looked up in the local Hugging Face cache, and downloaded only with
  ``allow_download`` (``--allow-download``). Nothing else touches the network.

Every input problem is an :class:`EvalInputError` with a one-line message naming the flag or file.
The mask id comes from the model config (``mask_token_id``), else from the tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_mdm.decoding.logits import LogitsFn
from megatron_mdm.errors import UserError


class EvalInputError(UserError, ValueError):
    """An input of mdm-eval / mdm-generate cannot be used; the one-line message names the flag or file."""


def read_data_lines(path: str) -> list[str]:
    """The lines of a ``--data`` file (UTF-8); a missing or undecodable file is an EvalInputError."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise EvalInputError(f"--data {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise EvalInputError(f"--data {path}: not UTF-8 text (byte {e.start})") from None


def iter_jsonl(path: str, lines: list[str]):
    """``(line number, parsed value)`` of each non-empty line; invalid JSON is an EvalInputError naming file:line."""
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield k, json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{path}:{k}: not valid JSON ({e.msg}, column {e.colno})") from None


@dataclass
class HFTokenizer:
    """The few tokenizer attributes evaluation needs, over a ``transformers`` tokenizer."""

    tok: Any

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def mask_id(self) -> int | None:
        return self.tok.mask_token_id

    @property
    def pad_id(self) -> int | None:
        return self.tok.pad_token_id

    @property
    def bos_id(self) -> int | None:
        return self.tok.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


# ---- where the model is ------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
# weights in pickle-based formats are never fetched (safetensors only)
_NOT_DOWNLOADED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot"]


def looks_like_hub_id(name: str) -> bool:
    """``name`` or ``org/name`` in the hub's alphabet (a path such as ``./x``, ``/x`` or ``a/b/c`` is not)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith((".json", ".jsonl"))


def resolve_model_dir(model: str, allow_download: bool = False, flag: str = "--model") -> Path:
    """The local directory of ``model``: the path itself, or a hub id's snapshot in the local cache.

    Args:
        model: a directory, or a hub id (``org/name``) when no such directory exists.
        allow_download: fetch a hub id missing from the cache (safetensors weights only).
        flag: the option named in error messages.
    Raises:
        EvalInputError: no such directory (and, for a hub id, not cached and no download allowed).
    """
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise EvalInputError(f"{flag} {model}: is a file; expected a model directory (config.json, weights, "
                             "tokenizer files, as mdm-convert to-hf writes)")
    if not looks_like_hub_id(model):
        raise EvalInputError(f"{flag} {model}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model, local_files_only=not allow_download,
                                      ignore_patterns=_NOT_DOWNLOADED))
    except (OSError, ValueError) as e:
        if not allow_download:
            raise EvalInputError(f"{flag} {model}: no such directory, and no hub model {model!r} in the local "
                                 "Hugging Face cache (pass --allow-download to fetch it from the hub)") from None
        raise EvalInputError(f"{flag} {model}: cannot download it from the Hugging Face hub: "
                             f"{_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_json(path: Path, flag: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{flag}: {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise EvalInputError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise EvalInputError(f"{flag}: {path}: expected a JSON object")
    return data


def remote_code_request(model_dir: Path, config: dict) -> str | None:
    """What in ``model_dir`` asks to run its own Python code (an ``auto_map``), or None."""
    if config.get("auto_map"):
        return f"config.json auto_map {config['auto_map']}"
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        auto = _read_json(tok_cfg, "--model").get("auto_map")
        if auto:
            return f"tokenizer_config.json auto_map {auto}"
    return None


# ---- loading -----------------------------------------------------------------------------------------

def _load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    if not trust_remote_code:  # the project's tokenizer: tokenizer.json only, never custom code
        from megatron_mdm.tokenization import MDMTokenizer

        try:
            return MDMTokenizer.load(path)
        except Exception:  # noqa: BLE001 - e.g. a slow (sentencepiece) tokenizer: transformers' class below
            pass
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                         local_files_only=True))
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise EvalInputError(f"--model {path}: cannot load its tokenizer: {_first_line(e)}") from None


def _load_model(path: Path, dtype: torch.dtype, trust_remote_code: bool, own: bool = False) -> torch.nn.Module:
    import transformers

    if own:  # our export: this package's classes, the shipped copy is not run
        from megatron_mdm.hf import modeling as hf_modeling

        try:
            return hf_modeling.load_model(path, dtype=dtype, local_files_only=True)
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise EvalInputError(f"--model {path}: cannot load the exported MDM ({_first_line(e)})") from None
    errors = []
    for auto in (transformers.AutoModelForMaskedLM, transformers.AutoModel):
        try:
            return auto.from_pretrained(str(path), trust_remote_code=trust_remote_code, dtype=dtype,
                                        local_files_only=True)
        except (ValueError, KeyError, OSError, ImportError) as e:
            errors.append(f"{auto.__name__}: {_first_line(e)}")
    raise EvalInputError(f"--model {path}: cannot load a masked LM ({'; '.join(errors)})")


def load_logits_fn(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False, allow_download: bool = False,
) -> tuple[LogitsFn, Any, int, int]:
    """Load a HF directory as (logits_fn, tokenizer, mask_id, vocab_size).

    Args:
        path: directory with config.json, weights and tokenizer files (or a cached hub id).
        device: where the model runs; the LogitsFn moves inputs there.
        dtype: parameter dtype.
        trust_remote_code: allow a directory that is not our own export to run the Python code it ships.
        allow_download: fetch a hub id that is not in the local cache.

    Returns:
        logits_fn (input_ids [b, s] -> float logits [b, s, V_padded]), tokenizer (``encode``/``decode``,
        ``eos_id``...), mask_id, vocab_size (real size, mask token included).
    Raises:
        EvalInputError: a missing directory, a malformed config, custom code without the flag, a model
            that does not load; the message is one line.
    """
    from megatron_mdm.hf import modeling as hf_modeling

    model_dir = resolve_model_dir(str(path), allow_download)
    if not (model_dir / "config.json").is_file():
        raise EvalInputError(f"--model {path}: no config.json in the directory (not a Hugging Face model "
                             "directory; mdm-convert to-hf writes one)")
    config = _read_json(model_dir / "config.json", "--model")
    own = hf_modeling.is_own_export(config)
    if own:
        trust_remote_code = False  # our classes, in-process: the shipped copy never runs
    else:
        asked = remote_code_request(model_dir, config)
        if asked and not trust_remote_code:
            raise EvalInputError(
                f"--model {path}: the directory asks to run its own Python code ({asked}); pass "
                "--trust-remote-code to allow it (the code runs with your permissions: only for sources you trust)")
        trust_remote_code = bool(asked)
    model = _load_model(model_dir, dtype, trust_remote_code, own).to(device).eval()
    tokenizer = _load_tokenizer(model_dir, trust_remote_code)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        mask_id = tokenizer.mask_id
    if mask_id is None:
        raise EvalInputError(f"--model {path}: no mask token id in config.json (mask_token_id) or in the tokenizer")
    vocab_size = max(int(tokenizer.vocab_size), int(mask_id) + 1)
    vocab_size = min(vocab_size, int(getattr(model.config, "vocab_size", vocab_size)))

    from megatron_mdm.decoding.backends.hf import HFForward  # KV cache and selected logits for our export

    return HFForward(model, device), tokenizer, int(mask_id), vocab_size
