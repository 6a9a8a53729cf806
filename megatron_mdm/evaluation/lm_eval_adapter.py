"""The lm-eval harness model ``mdm``: our likelihood estimators and sampler behind lm-eval's ``LM`` API.

* ``loglikelihood``: log p(continuation | context) by the Monte Carlo bound (``method=mc``, SMDM's
  default for most tasks) or the chain rule (``method=chain``, ``order=left_to_right|greedy``);
  ``is_greedy`` comes from the chain rule (always False for mc).
* ``loglikelihood_rolling``: the ELBO lower bound on log p(text), disjoint windows of ``max_length`` tokens.
* ``generate_until``: ``decoding.decode``, cut at the first stop string; the sampler's settings come
  from ``--model_args``: ``steps``, ``gen_length`` (when the task gives no ``max_gen_toks``),
  ``block_length``, ``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``remasking``, and fast decoding
  with ``cache=prefix|dual``, ``threshold=`` or ``factor=`` (and ``refresh_interval=``); a task's or
  ``--gen_kwargs``' generation kwargs override any of them per request.

**Batching** (``batch_size`` = rows per forward): likelihood requests are sorted longest first and the
rows of requests of one sequence length share forwards (``evaluation.batched_loglik``); each request
draws from its own generator seeded by the run ``seed`` and its tokens, so its value is the same
whatever the batch size, the other requests or their order (``chain`` with ``order=greedy`` runs
request by request). ``generate_until`` groups requests by their generation kwargs, sorts them longest
first and decodes ``batch_size`` prompts at a time (rows of one prompt length per batch, no padding); at
temperature 0 with a deterministic remasking rule a batch gives the same text as one prompt at a time.
Results come back in request order, and lm-eval's progress bar counts requests (``disable_tqdm``).

**Few-shot and chat**: ``num_fewshot``, ``apply_chat_template`` and ``fewshot_as_multiturn`` are
lm-eval's (``simple_evaluate`` builds the prompts); the adapter supplies what lm-eval's ``hf`` model
does: :meth:`MDMLM.apply_chat_template` (the tokenizer's own chat template), ``chat_template`` and
``tokenizer_name``.

Run lm-eval's own command line with ``mdm-eval harness run --model mdm --model_args pretrained=HF_DIR,...``
(``evaluation.harness``: lm-eval in a process where this module is imported, which registers the name ``mdm``;
a bare ``lm_eval --model mdm`` does not import it), or pass :meth:`MDMLM.from_logits_fn` to
``lm_eval.simple_evaluate``.
Loading is ``evaluation.loading.load_logits_fn``: our exports run no shipped code; another model directory
that ships code needs ``trust_remote_code=True`` in ``--model_args``; a hub id missing from the local
cache needs ``allow_download=True``. Works offline: tasks may use local data (``dataset_path: json``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megatron_mdm.decoding import decode
from megatron_mdm.decoding.logits import LogitsFn
from megatron_mdm.decoding.settings import DecodingConfig
from megatron_mdm.evaluation.batched_loglik import Scorer, chain_rows, mc_rows, request_seed, run_batched
from megatron_mdm.evaluation.loading import EvalInputError
from megatron_mdm.evaluation.multiple_choice import conditional_loglik, encode_pair

eval_logger = logging.getLogger(__name__)


def _as_bool(v: bool | str) -> bool:
    """A ``--model_args`` value: lm-eval passes True/False, or the string as typed."""
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")


@register_model("mdm")
class MDMLM(LM):
    """lm-eval model over a masked diffusion LM."""

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "mc",
        num_samples: int = 128,
        batch_size: int | str = 32,
        order: str = "left_to_right",
        cfg_scale: float | None = None,
        eps: float = 1e-3,
        seed: int = 1234,
        max_length: int = 2048,
        steps: int | None = None,
        gen_length: int | None = None,
        block_length: int | None = None,
        temperature: float | None = None,
        remasking: str | None = None,
        device: str = "cpu",
        cache: str | None = None,
        threshold: float | None = None,
        factor: float | None = None,
        refresh_interval: int | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        trust_remote_code: bool | str = False,
        allow_download: bool | str = False,
        progress: bool | str = True,
        **_: Any,
    ) -> None:
        super().__init__()
        if method not in ("mc", "chain"):
            raise EvalInputError(f"--model_args method: expected mc or chain, got {method!r}")
        if order not in ("left_to_right", "greedy"):
            raise EvalInputError(f"--model_args order: expected left_to_right or greedy, got {order!r}")
        self.method, self.order = method, order
        self.num_samples, self.eps = int(num_samples), float(eps)
        self.batch_size_ = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 32
        self.max_length, self.seed = int(max_length), int(seed)
        given = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
                     remasking=remasking, cfg_scale=cfg_scale, cache=cache, threshold=threshold, factor=factor,
                     refresh_interval=refresh_interval, top_k=top_k, top_p=top_p)
        try:  # inconsistent sampler settings: before the model loads (steps as decode_plan rounds them)
            #: the sampler's settings (defaults: DecodingConfig's); generate_until fits them to each request
            self.decoding = DecodingConfig.from_strings({k: v for k, v in given.items() if v is not None})
            if self.decoding.steps <= 0:
                raise ValueError(f"steps must be positive, got {self.decoding.steps}")
            if not self.gen_length % (self.block_length or 1):
                self.decoding.replace(steps=self.decode_plan(self.gen_length)[1]).validate()
            else:
                self.decoding.replace(steps=1).validate()
        except ValueError as e:
            raise EvalInputError(f"--model_args: {e}") from None
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's command line defaults to cuda
            eval_logger.warning(f"device {device}: CUDA is not available; running on the CPU")
            device = "cpu"
        self._device = device
        self.progress = _as_bool(progress)
        if pretrained is not None:
            from megatron_mdm.evaluation.loading import load_logits_fn

            self.logits_fn, self.tokenizer, self.mask_id, self.vocab_size = load_logits_fn(
                pretrained, device, trust_remote_code=_as_bool(trust_remote_code),
                allow_download=_as_bool(allow_download))

    def __getattr__(self, name: str) -> Any:
        """The sampler's settings read as attributes (``lm.steps``, ``lm.cfg_scale``, ...)."""
        if name in DecodingConfig.names() and "decoding" in self.__dict__:
            return getattr(self.__dict__["decoding"], name)
        raise AttributeError(name)

    @classmethod
    def from_logits_fn(
        cls, logits_fn: LogitsFn, tokenizer: Any, mask_id: int, vocab_size: int | None, **kwargs: Any
    ) -> MDMLM:
        """Wrap an in-memory model (e.g. a Megatron model's LogitsFn) instead of loading a directory."""
        lm = cls(pretrained=None, **kwargs)
        lm.logits_fn, lm.tokenizer, lm.mask_id, lm.vocab_size = logits_fn, tokenizer, mask_id, vocab_size
        return lm

    # ---- log-likelihoods -----------------------------------------------------------------------------

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx, cont = encode_pair(self.tokenizer.encode, context, continuation)
        keep = max(self.max_length - len(cont), 0)
        return (ctx[-keep:] if keep else []) if len(ctx) + len(cont) > self.max_length else ctx, cont

    def _scorer(self) -> Scorer:
        return Scorer(self.logits_fn, self.mask_id, self.vocab_size, self.cfg_scale)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(req.args[0], req.args[1]) for req in requests]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress,
                    desc="Running loglikelihood requests")

        def done(i: int, ll: torch.Tensor, greedy: torch.Tensor) -> None:
            value = float(ll.mean()) if self.method == "mc" else float(ll.sum())
            out[i] = (value, self.method == "chain" and bool(greedy.all()))
            self.cache_hook.add_partial("loglikelihood", requests[i].args, out[i])
            pbar.update(1)

        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        if self.method == "chain" and self.order == "greedy":  # sequential by nature: one request at a time
            for i in order:
                ctx, cont = pairs[i]
                ll, greedy = conditional_loglik(self.logits_fn, ctx, cont, self.mask_id, "chain", 1, None,
                                                self.vocab_size, self.cfg_scale, self.batch_size_, "greedy")
                done(i, torch.tensor([ll]), torch.tensor([greedy]))
        else:
            jobs = [(len(pairs[i][0]) + len(pairs[i][1]), self._rows_fn(i, *pairs[i])) for i in order]
            run_batched(jobs, self._scorer(), self.batch_size_, done)
        pbar.close()
        return out  # type: ignore[return-value]

    def _rows_fn(self, i: int, ctx: list[int], cont: list[int]):
        if not cont:
            raise EvalInputError(f"loglikelihood request {i}: the continuation is empty")
        if self.mask_id in ctx or self.mask_id in cont:
            raise EvalInputError(f"loglikelihood request {i}: the text contains the mask token")
        if self.method == "chain":
            return lambda: chain_rows(i, ctx + cont, len(ctx), self.mask_id)
        return lambda: mc_rows(i, ctx + cont, len(ctx), self.num_samples, self.eps, self.mask_id,
                               self.request_generator(ctx, len(cont)))

    def request_generator(self, *parts: list[int] | int) -> torch.Generator:
        """The generator of one request's draws (seeded by ``seed`` and the request's tokens)."""
        return torch.Generator().manual_seed(request_seed(self.seed, *parts))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows = []  # (request, window index, ids)
        for i, req in enumerate(requests):
            ids = self.tokenizer.encode(req.args[0])
            windows += [(i, w, ids[start : start + self.max_length])
                        for w, start in enumerate(range(0, len(ids), self.max_length))]
        totals = [0.0] * len(requests)
        left = [0] * len(requests)
        for i, _, _ in windows:
            left[i] += 1
        pbar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress,
                    desc="Running loglikelihood_rolling requests")

        def done(k: int, ll: torch.Tensor, _: torch.Tensor) -> None:
            i = windows[k][0]
            totals[i] += float(ll.mean())
            left[i] -= 1
            if left[i] == 0:
                self.cache_hook.add_partial("loglikelihood_rolling", requests[i].args, totals[i])
                pbar.update(1)

        pbar.update(left.count(0))  # empty texts: 0

        def make(k: int):
            _, w, ids = windows[k]
            return lambda: mc_rows(k, ids, 0, self.num_samples, self.eps, self.mask_id,
                                   self.request_generator(ids, w))

        order = sorted(range(len(windows)), key=lambda k: -len(windows[k][2]))
        run_batched(((len(windows[k][2]), make(k)) for k in order), self._scorer(), self.batch_size_, done)
        pbar.close()
        return totals

    # ---- generation ----------------------------------------------------------------------------------

    def decode_plan(self, gen_length: int, decoding: DecodingConfig | None = None) -> tuple[int | None, int]:
        """(block_length, steps) for ``gen_length`` positions: ``block_length`` when it divides them (else
        one block, with a warning), ``steps`` capped at ``gen_length`` and rounded down to a multiple of the
        number of blocks (``decoding``: the settings, default the model args')."""
        d = decoding or self.decoding
        block = d.block_length if d.block_length and gen_length % d.block_length == 0 else None
        if d.block_length and block is None:
            eval_logger.warning(f"block_length {d.block_length} does not divide max_gen_toks {gen_length}: "
                                "decoding it as one block")
        num_blocks = gen_length // block if block else 1
        return block, max(num_blocks, (min(d.steps, gen_length) // num_blocks) * num_blocks)

    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int, DecodingConfig]:
        """(stop strings, positions to generate, sampler settings) of a request's generation kwargs: lm-eval's
        (``until``, ``max_gen_toks``/``max_new_tokens``, ``temperature``, ``do_sample``) and any
        ``DecodingConfig`` field (``--gen_kwargs steps=32,cache=dual``) over the model args'."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        gen_length = int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.gen_length)))
        fields = {k: v for k, v in gen_kwargs.items() if k in DecodingConfig.names() and k != "gen_length"}
        try:
            decoding = DecodingConfig.from_strings(fields, base=self.decoding)
        except (TypeError, ValueError) as e:
            raise EvalInputError(f"--gen_kwargs: {e}") from None
        if gen_kwargs.get("do_sample") is False:
            decoding = decoding.replace(temperature=0.0)
        return until, gen_length, decoding

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        g = torch.Generator().manual_seed(self.seed)
        prompts = [self.tokenizer.encode(req.args[0]) for req in requests]
        kwargs = [dict(req.args[1]) if len(req.args) > 1 and req.args[1] else {} for req in requests]
        groups: dict[str, list[int]] = {}
        for i, kw in enumerate(kwargs):
            groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress,
                    desc="Running generate_until requests")
        eos_id = getattr(self.tokenizer, "eos_id", None)
        for idx in groups.values():
            until, gen_length, decoding = self._gen_settings(kwargs[idx[0]])
            block, steps = self.decode_plan(gen_length, decoding)
            settings = decoding.replace(gen_length=gen_length, steps=steps, block_length=block)
            keep = max(self.max_length - gen_length, 0)
            idx = sorted(idx, key=lambda i: -len(prompts[i]))  # longest first, as lm-eval's hf model
            for start in range(0, len(idx), self.batch_size_):
                chunk = idx[start : start + self.batch_size_]
                try:
                    res = decode(self.logits_fn, [prompts[i][-keep:] if keep else [] for i in chunk], settings,
                                 self.mask_id, eos_id=eos_id, generator=g, vocab_size=self.vocab_size)
                except ValueError as e:  # e.g. cache= on a model without KV cache support
                    raise EvalInputError(f"--model_args: {e}") from None
                for i, ids in zip(chunk, res.completions()):
                    text = self.tokenizer.decode(ids)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    pbar.update(1)
        pbar.close()
        return out  # type: ignore[return-value]

    # ---- chat templates (as lm-eval's hf model) ------------------------------------------------------

    def _hf_tokenizer(self) -> Any:
        """The ``transformers`` tokenizer inside ours (``MDMTokenizer.hf``, ``HFTokenizer.tok``)."""
        for name in ("hf", "tok"):
            if hasattr(self.tokenizer, name):
                return getattr(self.tokenizer, name)
        return self.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self._hf_tokenizer(), "name_or_path", "mdm")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template (a named one when it holds several), None when off or absent."""
        if chat_template is False or chat_template is None:
            return None
        template = getattr(self._hf_tokenizer(), "chat_template", None)
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise EvalInputError(f"--apply_chat_template: no chat template named {name!r}; the tokenizer has "
                                     f"{sorted(template)}")
            return template[name]
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered as text by the tokenizer's chat template (lm-eval's hf model's call)."""
        tok = self._hf_tokenizer()
        if not getattr(tok, "chat_template", None) or not hasattr(tok, "apply_chat_template"):
            raise EvalInputError("--apply_chat_template: the model's tokenizer has no chat template "
                                 "(tokenizer_config.json chat_template); run without --apply_chat_template")
        import jinja2

        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return tok.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:  # e.g. a template without a system role, as hf does
            return tok.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)
