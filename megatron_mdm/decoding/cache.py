r"""The KV cache of semi-autoregressive block decoding (Fast-dLLM's prefix and dual caches).

A masked diffusion model attends bidirectionally, so no position's keys/values are final while any
token can still change. Block decoding makes them *nearly* final (Wu et al. 2025, "Fast-dLLM"): the
prompt and the finished blocks change no more, and their K/V move little while the current block is
decoded. The cache is therefore recorded by a full forward at the start of each block (and every
``refresh_interval`` forwards, if asked), then serves the steps of that block:

* ``prefix``: K/V of ``[0, lo)`` (prompt + finished blocks) are cached; each step recomputes the
  current block *and* the masked suffix ``[lo, L)``, whose queries attend to the cached prefix and to
  their own fresh K/V.
* ``dual``: the K/V of the suffix ``[hi, L)`` are cached too; each step recomputes only the block
  ``[lo, hi)``: its queries attend to cached prefix K/V + its own fresh K/V + cached suffix K/V.

A cache refreshed at every step is exactly the uncached computation.

**No copies per step.** The full forward's own K/V tensors (whole sequence, after RoPE) are kept as the
cache; each window forward writes its fresh K/V into them in place, at the window's positions, and attends
to the whole tensors (Fast-dLLM's dual cache writes its block the same way). Nothing is concatenated or
allocated per step: the cached prefix and suffix are simply the positions no window overwrites.

**One mechanism for every backend.** :class:`KVCache` implements the ``update(key, value,
layer_idx, ...)`` method of transformers' ``Cache`` protocol: an attention layer hands it the keys and
values it just computed (after RoPE) and attends to what it returns. The exported Hugging Face model
(``hf/modeling/modeling_mdm.py``) passes it to transformers' attention layers, which call ``update``
themselves; the Megatron path calls it from a forward pre-hook on each layer's core attention
(``decoding.backends.megatron.MegatronForward``). The two layouts differ only in where the sequence dimension is
(``seq_dim``: 2 for HF ``[b, heads, s, d]``, 0 for Megatron ``[s, b, heads, d]``).
"""

from __future__ import annotations

import torch

from .settings import MODES  # noqa: E402,F401 - the names live with the settings


class KVCache:
    """Per-layer K/V of the whole sequence; windows are written into it in place.

    Call :meth:`record` before a full forward of the whole sequence (its K/V become the cache), then
    :meth:`window` before each forward of the window.

    Args:
        seq_dim: the sequence dimension of the K/V tensors the model hands to :meth:`update`.
    """

    def __init__(self, seq_dim: int):
        self.seq_dim = seq_dim
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._slots: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, width) -> window views
        self._mode: str | None = None
        self._lo = 0  # window start recorded
        self._hi: int | None = None  # window end recorded (dual); None: windows run to the end (prefix)
        self._seq_len = 0

    def record(self, lo: int, hi: int | None) -> None:
        """The next forward is the whole sequence; later windows are ``[lo, hi)`` (dual) or ``[lo, L)`` (``hi`` None)."""
        self._mode, self._lo, self._hi = "record", lo, hi
        self.keys.clear()
        self.values.clear()
        self._slots.clear()

    def window(self, lo: int, hi: int) -> None:
        """The next forward is positions ``[lo, hi)``; the rest comes from the recorded K/V."""
        if self._mode is None:
            raise RuntimeError("KVCache.window before any record(): the first forward must be a full one")
        if lo != self._lo:
            raise RuntimeError(f"KVCache: window starts at {lo}, but the cache was recorded for {self._lo}")
        if self._hi is not None and hi != self._hi:
            raise RuntimeError(f"KVCache: window ends at {hi}, but the suffix was recorded from {self._hi}")
        if self._hi is None and hi != self._seq_len:
            raise RuntimeError("KVCache: a prefix cache serves windows that run to the end of the sequence")
        self._mode = "window"

    def key_length(self, q: int) -> int:
        """How many keys the next forward's queries attend to (``q`` when it records: the whole sequence)."""
        return q if self._mode == "record" else self._seq_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cached positions before the window (transformers' ``Cache`` protocol)."""
        return self._lo

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Take one layer's fresh K/V; return the K/V its queries attend to (transformers' protocol).

        Args:
            key, value: K/V of the positions in this forward (after RoPE), ``seq_dim`` = sequence.
            layer_idx: 0-based layer index.

        Returns:
            (key, value) over the whole sequence: cached prefix, this window's fresh K/V, cached suffix.
        """
        if self._mode == "record":
            self._seq_len = key.shape[self.seq_dim]
            self.keys[layer_idx], self.values[layer_idx] = key, value  # no copy: the forward's own tensors
            return key, value
        if self._mode == "window":
            n = key.shape[self.seq_dim]
            slot = self._slots.get((layer_idx, n))
            if slot is None:  # the window's positions in the recorded tensors (views, made once per record)
                slot = (self.keys[layer_idx].narrow(self.seq_dim, self._lo, n),
                        self.values[layer_idx].narrow(self.seq_dim, self._lo, n))
                self._slots[layer_idx, n] = slot
            slot[0].copy_(key)
            slot[1].copy_(value)
            return self.keys[layer_idx], self.values[layer_idx]
        raise RuntimeError("KVCache.update outside record()/window()")
