"""Training metrics: throughput, TFLOP/s and MFU, memory, and their sinks (stdout, JSON lines, TensorBoard).

MFU = achieved model FLOP/s / peak dense FLOP/s of the device. Model FLOPs per sequence come from
``model.flops_per_sequence`` (6·N·S + head + full S² attention for the bidirectional MDM), so an MDM
is never credited with the causal discount.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

# dense BF16 peak TFLOP/s (no sparsity) by device name fragment
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """Peak dense TFLOP/s of this device (BF16), or None when unknown (CPU)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in _PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def memory_gib() -> dict[str, float]:
    """Peak device memory (GPU) or resident memory (CPU) of this process, in GiB."""
    if torch.cuda.is_available():
        return {
            "mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    try:
        import psutil

        return {"mem_rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    except ImportError:  # pragma: no cover
        return {}


class Throughput:
    """Tokens/s and FLOP/s over the steps since the last report."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, world_size: int,
                 peak: Optional[float]):
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.world_size = world_size
        self.peak = peak
        self._t0 = time.perf_counter()
        self._steps = 0

    def step(self) -> None:
        self._steps += 1

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        steps = max(self._steps, 1)
        tflops = self.flops_per_step * steps / elapsed / self.world_size / 1e12
        out = {
            "step_time_s": elapsed / steps,
            "tokens_per_sec": self.tokens_per_step * steps / elapsed,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
        }
        self._t0, self._steps = now, 0
        return out


class MetricsWriter:
    """Writes one JSON object per logged step / evaluation to ``metrics.jsonl`` and TensorBoard."""

    def __init__(self, save_dir: Optional[str], tensorboard_dir: Optional[str], enabled: bool):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(save_dir) / "metrics.jsonl", "a", encoding="utf-8")
        tb_dir = tensorboard_dir or (str(Path(save_dir) / "tensorboard") if save_dir else None)
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=tb_dir)
            except ImportError:
                log.warning("tensorboard is not installed: --tensorboard-dir ignored")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = record.get("iteration", 0)
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def format_line(record: dict) -> str:
    """A human-readable log line of a training record."""
    parts = [f"iter {record['iteration']:>7d}"]
    fmt = {
        "loss": "loss {:.4f}", "lr": "lr {:.3e}", "grad_norm": "grad_norm {:.3f}",
        "tokens_per_sec": "tok/s {:,.0f}", "tflops_per_device": "TFLOP/s/dev {:.2f}",
        "mfu": "MFU {:.1%}", "mem_alloc_gib": "mem {:.2f} GiB", "mem_rss_gib": "rss {:.2f} GiB",
        "eta_s": "ETA {:.0f}s", "skipped_steps": "skipped {}",
    }
    for key, f in fmt.items():
        v = record.get(key)
        if v is not None and not (key == "skipped_steps" and v == 0):
            parts.append(f.format(v))
    return " | ".join(parts)
