"""CPU development mode: every CUDA stand-in Megatron-core needs to run on CPU with gloo.

Megatron-core (0.16 to 0.19) has no CPU mode: it calls ``torch.cuda`` APIs, creates tensors with
``device="cuda"`` and checks ``param.type()`` for ``torch.cuda.*Tensor`` names. This module patches
those spots so that development, tests and CI run the real Megatron-core code paths (GPTModel, DDP,
schedules, optimizers, distributed checkpoints) on CPU processes over gloo.

It is a **development mode**, never used on GPUs: ``megatron_mdm.runtime`` enables it only when no
CUDA device is present, and logs that it is on. ``enable()`` is idempotent; ``disable()`` restores
everything (tests use it).

Patches, each with the Megatron code it serves:

====================================  =====================================================================
patch                                 why
====================================  =====================================================================
``torch.cuda.current_device``         rotary embedding ``get_emb``, ``param_and_grad_buffer`` (-> "cpu")
``torch.cuda.synchronize``            timers, async checkpoint save (``filesystem_async``): no-op
``torch.cuda.set_device``             process setup: no-op
``torch.cuda.device_count``           parallel-state helpers: 1
``torch.cuda.is_available``           left False: code that checks it takes its own CPU path
``torch.cuda.get/set_rng_state``,     ``tensor_parallel.random`` RNG tracker (``model_parallel_cuda_
``manual_seed(_all)``                 manual_seed``): the CPU generator stands in for the CUDA one
``torch.cuda.Stream/Event/stream``    DDP bucket communication, schedules: inert stand-ins
``torch.cuda.memory_*`` /             memory reports: 0
``max_memory_allocated``
``Tensor.cuda``, ``Module.cuda``      ``.cuda()`` calls in optimizers and checkpointing: identity on CPU
device="cuda" kwargs                  a ``TorchFunctionMode`` rewrites ``device="cuda"``/``cuda:N``/int
                                      device arguments of factory functions and ``.to`` to CPU
``pin_memory=True`` kwargs            rotary ``get_pos_emb_on_this_cp_rank`` (context parallelism): the
                                      same mode drops it (no pinned-memory allocator without CUDA)
``Tensor.type()`` (no argument)       ``optimizer.py``/``distrib_optimizer.py`` (TypeError unless
                                      ``torch.cuda.FloatTensor``...) and ``clip_grads.py`` (assert):
                                      CPU tensors report the CUDA type name, so FP32/BF16 optimizers,
                                      the distributed optimizer and gradient clipping run on CPU
====================================  =====================================================================

Not covered (raise clearly instead): sequence parallelism (needs TE/Apex norms), FP8, the TE spec.

Megatron-core's known-harmless warnings of a CPU run (``KNOWN_CPU_WARNINGS``: no Transformer Engine or Apex, the
Torch norm fallback, ``CUDA_DEVICE_MAX_CONNECTIONS``, its own deprecated default ``cuda_graph_scope``, and the two
torch deprecations its checkpoint loading raises) are hidden by ``hide_known_warnings()``, which the CPU mode's
one log line mentions; every other warning stays.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_SAVED: dict[tuple[Any, str], Any] = {}
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(d: Any) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, int) and not isinstance(d, bool):
        return True  # integer devices mean CUDA ordinals in torch
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments (``device=`` kwargs, ``.to("cuda")``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        name = getattr(func, "__name__", "")
        if name == "to" and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a) and not isinstance(a, int)) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class _InertStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _InertEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _InertEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _patch(obj: Any, name: str, value: Any) -> None:
    key = (obj, name)
    if key not in _SAVED:
        _SAVED[key] = getattr(obj, name, None)
    setattr(obj, name, value)


def _cpu_rng_get(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(state)


def _make_tensor_type(orig: Callable) -> Callable:
    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            if self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[self.dtype]
            return orig(self)
        return orig(self, dtype, non_blocking, **kwargs)

    return tensor_type


KNOWN_CPU_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"Transformer Engine and Apex are not installed", "import of the optimizer and FSDP modules: CPU has neither"),
    (r"Apex is not installed\. Falling back to Torch Norm", "layer specs: the Torch norm is the CPU norm"),
    (r".*CUDA_DEVICE_MAX_CONNECTIONS", "tensor-parallel layers' async all-reduce: a CUDA stream setting"),
    (r"full scope is deprecated", "TransformerConfig's own default cuda_graph_scope (no CUDA graphs on CPU)"),
    (r"`load_state_dict` is deprecated", "dist_checkpointing's torch strategy, on every checkpoint load: a torch "
                                         "API megatron-core 0.16 still calls"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", "the same load, through torch's "
                                                                          "ShardedTensor"),
)
"""(message regex, where it arises and why it is harmless) of each megatron-core warning hidden on CPU."""

_HIDDEN = False


def hide_known_warnings() -> None:
    """Ignore the ``KNOWN_CPU_WARNINGS`` in this process (idempotent); other warnings are untouched."""
    global _HIDDEN
    if _HIDDEN:
        return
    for pattern, _why in KNOWN_CPU_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    _HIDDEN = True


def enable() -> None:
    """Switch on the CPU development mode (idempotent). Only call when no GPU is present."""
    global _MODE
    if _MODE is not None:
        return
    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: "cpu")
    _patch(cuda, "synchronize", lambda *a, **k: None)
    _patch(cuda, "set_device", lambda *a, **k: None)
    _patch(cuda, "device_count", lambda: 1)
    _patch(cuda, "get_rng_state", _cpu_rng_get)
    _patch(cuda, "set_rng_state", _cpu_rng_set)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly
    _patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _patch(cuda, "manual_seed_all", lambda seed: None)
    _patch(cuda, "Stream", _InertStream)
    _patch(cuda, "Event", _InertEvent)
    _patch(cuda, "current_stream", lambda *a, **k: _InertStream())
    _patch(cuda, "default_stream", lambda *a, **k: _InertStream())
    _patch(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _patch(cuda, "empty_cache", lambda: None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        _patch(cuda, name, lambda *a, **k: 0)
    _patch(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    import torch.cuda.random as cuda_random

    _patch(cuda_random, "get_rng_state", _cpu_rng_get)
    _patch(cuda_random, "set_rng_state", _cpu_rng_set)
    _patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _patch(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    _patch(torch.Tensor, "type", _make_tensor_type(torch.Tensor.type))
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    hide_known_warnings()
    log.warning("megatron-mdm: CPU development mode is ON (no GPU found): Megatron-core runs on gloo; its %d "
                "known-harmless warnings here (no Transformer Engine/Apex, Torch norm, CUDA_DEVICE_MAX_CONNECTIONS, "
                "cuda_graph_scope, torch deprecations on checkpoint load) are hidden", len(KNOWN_CPU_WARNINGS))


def disable() -> None:
    """Undo every patch of ``enable()``."""
    global _MODE
    if _MODE is None:
        return
    _MODE.__exit__(None, None, None)
    _MODE = None
    for (obj, name), value in reversed(list(_SAVED.items())):
        setattr(obj, name, value)
    _SAVED.clear()
