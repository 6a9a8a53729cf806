"""The lm-eval harness model ``mdm``: our likelihood estimators and sampler behind lm-eval's ``LM`` API.

* ``loglikelihood``: log p(continuation | context) by the Monte Carlo bound (``method=mc``, SMDM's
  default for most tasks) or the chain rule (``method=chain``, ``order=left_to_right|greedy``);
  ``is_greedy`` comes from the chain rule (always False for mc).
* ``loglikelihood_rolling``: the ELBO lower bound on log p(text), windows of ``max_length`` tokens.
* ``generate_until``: ``sampling.generate``, cut at the first stop string.

Construct with ``--model mdm --model_args pretrained=HF_DIR,method=mc,num_samples=128`` (importing this
module registers the name), or pass :meth:`MDMLM.from_logits_fn` to ``lm_eval.simple_evaluate``.
Loading is ``evaluation.loading.load_logits_fn``: our exports run no shipped code; another model directory
that ships code needs ``trust_remote_code=True`` in ``--model_args``; a hub id missing from the local
cache needs ``allow_download=True``.
Works offline: tasks may use local data (``dataset_path: json`` with ``data_files``).
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megatron_mdm.evaluation.multiple_choice import conditional_loglik, encode_pair
from megatron_mdm.guidance import LogitsFn
from megatron_mdm.likelihood import mc_elbo
from megatron_mdm.sampling import generate


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
        cfg_scale: float = 0.0,
        eps: float = 1e-3,
        seed: int = 1234,
        max_length: int = 2048,
        steps: int = 64,
        gen_length: int = 64,
        block_length: int | None = None,
        temperature: float = 0.0,
        remasking: str = "low_confidence",
        device: str = "cpu",
        trust_remote_code: bool | str = False,
        allow_download: bool | str = False,
        **_: Any,
    ) -> None:
        super().__init__()
        if method not in ("mc", "chain"):
            raise ValueError(f"method: expected mc or chain, got {method!r}")
        self.method, self.order = method, order
        self.num_samples, self.cfg_scale, self.eps = int(num_samples), float(cfg_scale), float(eps)
        self.batch_size_ = int(batch_size) if str(batch_size).isdigit() else 32
        self.max_length, self.seed = int(max_length), int(seed)
        self.steps, self.gen_length = int(steps), int(gen_length)
        self.block_length = int(block_length) if block_length not in (None, "", "None") else None
        self.temperature, self.remasking = float(temperature), remasking
        self._device = device
        if pretrained is not None:
            from megatron_mdm.evaluation.loading import load_logits_fn

            self.logits_fn, self.tokenizer, self.mask_id, self.vocab_size = load_logits_fn(
                pretrained, device, trust_remote_code=_as_bool(trust_remote_code),
                allow_download=_as_bool(allow_download))

    @classmethod
    def from_logits_fn(
        cls, logits_fn: LogitsFn, tokenizer: Any, mask_id: int, vocab_size: int | None, **kwargs: Any
    ) -> MDMLM:
        """Wrap an in-memory model (e.g. a Megatron model's LogitsFn) instead of loading a directory."""
        lm = cls(pretrained=None, **kwargs)
        lm.logits_fn, lm.tokenizer, lm.mask_id, lm.vocab_size = logits_fn, tokenizer, mask_id, vocab_size
        return lm

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        g = self._generator()
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = encode_pair(self.tokenizer.encode, context, continuation)
            ctx = ctx[-max(self.max_length - len(cont), 0) :] if len(ctx) + len(cont) > self.max_length else ctx
            ll, greedy = conditional_loglik(
                self.logits_fn, ctx, cont, self.mask_id, self.method, self.num_samples, g, self.vocab_size,
                self.cfg_scale, self.batch_size_, self.order, self.eps,
            )
            out.append((ll, greedy))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        g = self._generator()
        out = []
        for req in requests:
            ids = self.tokenizer.encode(req.args[0])
            total = 0.0
            for start in range(0, len(ids), self.max_length):
                window = torch.tensor([ids[start : start + self.max_length]], dtype=torch.long)
                r = mc_elbo(
                    self.logits_fn, window, self.mask_id, self.num_samples, eps=self.eps, t_sampling="antithetic",
                    generator=g, vocab_size=self.vocab_size, batch_size=self.batch_size_,
                )
                total -= float(r.nll_per_token[0]) * window.shape[1]
            out.append(total)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        g = self._generator()
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            gen_length = int(kwargs.get("max_gen_toks", self.gen_length))
            block = self.block_length if self.block_length and gen_length % self.block_length == 0 else None
            num_blocks = gen_length // block if block else 1
            steps = max(num_blocks, (min(self.steps, gen_length) // num_blocks) * num_blocks)
            res = generate(
                self.logits_fn, [self.tokenizer.encode(context)], gen_length, steps, self.mask_id,
                block_length=block, temperature=float(kwargs.get("temperature", self.temperature)),
                remasking=self.remasking, cfg_scale=self.cfg_scale, eos_id=getattr(self.tokenizer, "eos_id", None),
                generator=g, vocab_size=self.vocab_size,
            )
            text = self.tokenizer.decode(res.completions()[0])
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out
