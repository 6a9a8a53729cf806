"""The sweep's figure: IsoFLOP curves, the optimal-N frontier and the loss frontier, MDM and ARM together.

Three panels, one PNG: (1) final validation loss against N for every budget (points: runs; lines: the
fitted parabolas in ln N; crosses: their minima), MDM solid and ARM dashed, one colour per budget;
(2) N*(C) and D*(C) with their power-law fits; (3) L*(C) with its power-law fit, and the compute
multiplier of MDM over ARM printed when both objectives are present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_mdm.sweep.curves import _pyplot
from megatron_mdm.sweep.fit import usable_rows

STYLE = {"mdm": dict(linestyle="-", marker="o"), "arm": dict(linestyle="--", marker="s")}


def plot_sweep(rows: list[dict], fit: dict, output: str | Path, title: str | None = None) -> Path:
    plt = _pyplot()
    rows = usable_rows(rows)
    budgets = sorted({float(r["budget"]) for r in rows})
    colors = {c: f"C{i % 10}" for i, c in enumerate(budgets)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    ax_iso, ax_n, ax_l = axes
    for obj, e in fit["objectives"].items():
        st = STYLE.get(obj, {})
        for b in e["budgets"]:
            c = b["budget"]
            pts = sorted((r["non_embedding_params"], r["val_loss"]) for r in rows
                         if r["objective"] == obj and float(r["budget"]) == c)
            n = np.array([p[0] for p in pts], dtype=float)
            ax_iso.plot(n, [p[1] for p in pts], color=colors[c], linestyle="none", marker=st.get("marker", "o"),
                        markersize=5, alpha=0.8)
            x = np.linspace(np.log(n.min()) - 0.15, np.log(n.max()) + 0.15, 100)
            p2, p1, p0 = b["coef"]
            ax_iso.plot(np.exp(x), p2 * x * x + p1 * x + p0, color=colors[c], linestyle=st.get("linestyle", "-"),
                        linewidth=1.2, label=f"{obj.upper()} C={c:.2g}")
            ax_iso.plot([b["n_opt"]], [b["loss_opt"]], color=colors[c], marker="x", markersize=9, mew=2)
        # budgets whose parabola failed: points only
        fitted = {b["budget"] for b in e["budgets"]}
        for c in budgets:
            if c in fitted:
                continue
            pts = sorted((r["non_embedding_params"], r["val_loss"]) for r in rows
                         if r["objective"] == obj and float(r["budget"]) == c)
            if pts:
                ax_iso.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[c], linestyle=":",
                            marker=st.get("marker", "o"), label=f"{obj.upper()} C={c:.2g} (no minimum)")
        if "n_opt_exponent" not in e:
            continue
        cs = np.array([b["budget"] for b in e["budgets"]])
        cc = np.geomspace(cs.min() / 1.5, cs.max() * 1.5, 50)
        a, kn = e["n_opt_exponent"]["value"], e["n_opt_coef"]
        bexp, kd = e["d_opt_exponent"]["value"], e["d_opt_coef"]
        ax_n.plot(cs, [b["n_opt"] for b in e["budgets"]], color="C0", linestyle="none", marker=st.get("marker"))
        ax_n.plot(cc, kn * cc ** a, color="C0", linestyle=st.get("linestyle"), label=f"{obj.upper()} N* ∝ C^{a:.2f}")
        ax_n.plot(cs, [b["d_opt"] for b in e["budgets"]], color="C3", linestyle="none", marker=st.get("marker"))
        ax_n.plot(cc, kd * cc ** bexp, color="C3", linestyle=st.get("linestyle"),
                  label=f"{obj.upper()} D* ∝ C^{bexp:.2f}")
        g, kl = e["loss_opt_exponent"]["value"], e["loss_opt_coef"]
        col = "C1" if obj == "mdm" else "C2"
        ax_l.plot(cs, [b["loss_opt"] for b in e["budgets"]], color=col, linestyle="none", marker=st.get("marker"))
        ax_l.plot(cc, kl * cc ** g, color=col, linestyle=st.get("linestyle"), label=f"{obj.upper()} L* ∝ C^{g:.3f}")
    m = fit.get("multiplier")
    if m:
        text = "MDM/ARM compute at equal loss:\n" + "\n".join(
            f"C={b['budget']:.2g}: {b['multiplier']:.3g}x" + (" (extrap.)" if b.get("extrapolated") else "")
            for b in m["budgets"])
        ax_l.text(0.03, 0.04, text, transform=ax_l.transAxes, fontsize=8, va="bottom",
                  bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    ax_iso.set_xscale("log")
    ax_iso.set_xlabel("non-embedding parameters N")
    ax_iso.set_ylabel("final validation loss (nats/token; MDM: ELBO)")
    ax_iso.set_title("IsoFLOP curves (MDM solid, ARM dashed)")
    ax_iso.legend(fontsize=7)
    for ax in (ax_n, ax_l):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C = 6·N·D (FLOPs)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no IsoFLOP minima to fit\n(see mdm-sweep fit)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="0.4")
        ax.grid(alpha=0.3, which="both")
    ax_iso.grid(alpha=0.3, which="both")
    ax_n.set_ylabel("optimal N* (blue), D* (red)")
    ax_n.set_title("compute-optimal allocation")
    ax_l.set_ylabel("IsoFLOP minimum loss L*")
    ax_l.set_title("loss frontier")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
