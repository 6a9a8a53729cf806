"""Named model sizes: data, one entry per size (litgpt's ``Config.from_name`` style).

The SMDM family is the scaling-law grid of Nie et al. (2025) (Llama-style, TinyLlama-shaped at the
top: 1.1B = 22 layers, hidden 2048, 32 heads, 4 KV groups, SwiGLU 5632). Intermediate sizes follow
the SMDM code's grid (heads of 64 dims; SwiGLU ~ 8/3 hidden rounded to 64; 4 KV groups from 1B on).
Llama-shaped 3B (Llama-3.2-3B) and 8B (Llama-3-8B) presets serve larger runs. ``tiny*`` presets
are for tests and the CPU quickstart. The vocabulary comes from the tokenizer, never from a preset.
"""

from __future__ import annotations


def _llama(layers: int, hidden: int, heads: int, groups: int, ffn: int, **extra) -> dict:
    d = {
        "num_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "ffn_hidden_size": ffn,
    }
    d.update(extra)
    return d


PRESETS: dict[str, dict] = {
    # tests and the CPU quickstart
    "tiny": _llama(2, 64, 4, 2, 176),
    "tiny-4l": _llama(4, 64, 4, 2, 176),
    "quickstart": _llama(4, 128, 4, 2, 352),
    # the SMDM scaling family (non-embedding sizes in the names are approximate)
    "smdm-19m": _llama(8, 320, 5, 5, 896),
    "smdm-34m": _llama(8, 448, 7, 7, 1216),
    "smdm-48m": _llama(9, 512, 8, 8, 1408),
    "smdm-66m": _llama(10, 576, 9, 9, 1536),
    "smdm-85m": _llama(13, 640, 10, 10, 1728),
    "smdm-113m": _llama(12, 768, 12, 12, 2048),
    "smdm-142m": _llama(15, 768, 12, 12, 2048),
    "smdm-170m": _llama(18, 768, 12, 12, 2048),
    "smdm-220m": _llama(20, 832, 13, 13, 2240),
    "smdm-336m": _llama(24, 1024, 16, 16, 2816),
    "smdm-472m": _llama(24, 1280, 20, 20, 3456),
    "smdm-1.1b": _llama(22, 2048, 32, 4, 5632, rotary_base=10000, norm_epsilon=1e-5),
    # Llama-shaped larger presets
    "llama-3b": _llama(28, 3072, 24, 8, 8192, rotary_base=500000),
    "llama-8b": _llama(32, 4096, 32, 8, 14336, rotary_base=500000),
}


def get_preset(name: str) -> dict:
    """A copy of the preset's model fields; ValueError naming the choices for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
