"""The sweep's figure from ``results.csv`` and ``fit.json``: IsoFLOP curves, the compute-optimal allocation,
the loss frontiers and the MDM/ARM compute multiplier.

Four panels, one PNG: (1) final validation loss against N for every budget of the main grid (points: runs;
lines: the fitted parabolas in ln N; crosses: their minima, hollow where the vertex lies outside the sampled
sizes; dotted: budgets whose losses have no interior minimum, not fitted), MDM solid and ARM dashed, one
colour per budget;
(2) N*(C) and D*(C) with their power laws; (3) the minima L*(C) with the laws E + k·C^γ' (solid, E dotted)
and the pure power laws k·C^γ (thin); (4) the multiplier at each ARM budget, from the laws of L* - E and
read off the measured frontiers, with bootstrap intervals; filled markers where the ARM's loss lies within
the MDM's measured losses (interpolated), hollow where not (extrapolated), the pure power law in grey.
Legends sit below their panels, so that they never cover data; log axes of losses and multipliers carry
plain decimal tick labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_mdm.sweep.checks import main_rows
from megatron_mdm.sweep.curves import _pyplot, save_figure

STYLE = {"mdm": dict(linestyle="-", marker="o"), "arm": dict(linestyle="--", marker="s")}
FRONTIER_COLOR = {"mdm": "C1", "arm": "C2"}


def plot_sweep(rows: list[dict], fit: dict, output: str | Path, title: str | None = None) -> Path:
    plt = _pyplot()
    rows = main_rows(rows)
    budgets = sorted({float(r["budget"]) for r in rows})
    colors = {c: plt.get_cmap("viridis")(i / max(len(budgets) - 1, 1)) for i, c in enumerate(budgets)}
    fig, axes = plt.subplots(1, 4, figsize=(21, 6.4))
    ax_iso, ax_n, ax_l, ax_m = axes
    xlabel = "compute C = 6·N·D (FLOPs)" if fit.get("flops", "6nd") == "6nd" else "compute C, full count (FLOPs)"
    for obj, e in fit["objectives"].items():
        _isoflop_panel(ax_iso, rows, obj, e, colors)
        if "n_opt_exponent" not in e:
            continue
        st = STYLE.get(obj, {})
        cs = np.array([b["compute"] for b in e["budgets"]])
        cc = np.geomspace(cs.min() / 1.5, cs.max() * 1.5, 50)
        a, bexp = e["n_opt_exponent"]["value"], e["d_opt_exponent"]["value"]
        ax_n.plot(cs, [b["n_opt"] for b in e["budgets"]], color="C0", linestyle="none", marker=st.get("marker"))
        ax_n.plot(cc, e["n_opt_coef"] * cc ** a, color="C0", linestyle=st.get("linestyle"),
                  label=f"{obj.upper()} N* ∝ C^{a:.2f}")
        ax_n.plot(cs, [b["d_opt"] for b in e["budgets"]], color="C3", linestyle="none", marker=st.get("marker"))
        ax_n.plot(cc, e["d_opt_coef"] * cc ** bexp, color="C3", linestyle=st.get("linestyle"),
                  label=f"{obj.upper()} D* ∝ C^{bexp:.2f}")
        col = FRONTIER_COLOR.get(obj, "C4")
        ax_l.plot(cs, [b["loss_opt"] for b in e["budgets"]], color=col, linestyle="none", marker=st.get("marker"),
                  label=f"{obj.upper()} IsoFLOP minima")
        g = e["loss_opt_exponent"]["value"]
        ax_l.plot(cc, e["loss_opt_coef"] * cc ** g, color=col, linestyle=st.get("linestyle"), linewidth=0.7,
                  alpha=0.6, label=f"{obj.upper()} pure law k·C^{g:.3f}")
        if "reducible_exponent" in e:
            big_e, gr = e["parametric"]["E"]["value"], e["reducible_exponent"]["value"]
            ax_l.plot(cc, big_e + e["reducible_coef"] * cc ** gr, color=col, linestyle=st.get("linestyle"),
                      linewidth=1.8, label=f"{obj.upper()} E + k·C^{gr:.3f}, E = {big_e:.2f}")
            ax_l.axhline(big_e, color=col, linestyle=":", linewidth=0.8)
    _multiplier_panel(ax_m, fit.get("multiplier"), xlabel)
    ax_iso.set_xscale("log")
    ax_iso.set_xlabel("non-embedding parameters N")
    ax_iso.set_ylabel("final validation loss (nats/token; MDM: ELBO)")
    ax_iso.set_title("IsoFLOP curves (MDM solid, ARM dashed)")
    _legend_below(ax_iso, _marker_key(plt, fit), ncol=2)
    for ax in (ax_n, ax_l):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        if ax.get_legend_handles_labels()[0]:
            _legend_below(ax)
        else:
            ax.text(0.5, 0.5, "no IsoFLOP minima to fit\n(see mdm-sweep fit)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="0.4")
        ax.grid(alpha=0.3, which="both")
    ax_n.set_yscale("log")
    ax_iso.grid(alpha=0.3, which="both")
    ax_n.set_ylabel("optimal N* (blue), D* (red)")
    ax_n.set_title("compute-optimal allocation")
    ax_l.set_ylabel("IsoFLOP minimum loss L*")
    ax_l.set_title("loss frontiers")
    if title:
        fig.suptitle(title)
    return save_figure(fig, output)


def _isoflop_panel(ax, rows: list[dict], obj: str, e: dict, colors: dict) -> None:
    st = STYLE.get(obj, {})
    fitted = set()
    for b in e["budgets"]:
        c = b["budget"]
        fitted.add(c)
        pts = sorted((r["non_embedding_params"], r["val_loss"]) for r in rows
                     if r["objective"] == obj and float(r["budget"]) == c)
        n = np.array([p[0] for p in pts], dtype=float)
        ax.plot(n, [p[1] for p in pts], color=colors[c], linestyle="none", marker=st.get("marker", "o"),
                markersize=5, alpha=0.8)
        x = np.linspace(np.log(n.min()) - 0.15, np.log(n.max()) + 0.15, 100)
        p2, p1, p0 = b["coef"]
        ax.plot(np.exp(x), p2 * x * x + p1 * x + p0, color=colors[c], linestyle=st.get("linestyle", "-"),
                linewidth=1.2, label=f"{obj.upper()} C={c:.3g}")
        inside = b.get("inside", True)
        ax.plot([b["n_opt"]], [b["loss_opt"]], color=colors[c], linestyle="none",
                marker="x" if inside else "X", markersize=9, mew=2 if inside else 1,
                markerfacecolor=colors[c] if inside else "white")
    for c in sorted({float(r["budget"]) for r in rows if r["objective"] == obj} - fitted):  # no parabola
        pts = sorted((r["non_embedding_params"], r["val_loss"]) for r in rows
                     if r["objective"] == obj and float(r["budget"]) == c)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[c], linestyle=":",
                marker=st.get("marker", "o"), label=f"{obj.upper()} C={c:.3g}: no interior minimum, not fitted")


def _marker_key(plt, fit: dict) -> list:
    """Legend entries for the marks of the IsoFLOP panel that no curve label explains."""
    from matplotlib.lines import Line2D

    key = [Line2D([], [], color="0.3", linestyle="none", marker=STYLE[o]["marker"], label=f"{o.upper()} run")
           for o in fit["objectives"] if o in STYLE]
    key.append(Line2D([], [], color="0.3", linestyle="none", marker="x", markersize=8, mew=2,
                      label="fitted minimum (parabola vertex)"))
    if any(not b.get("inside", True) for e in fit["objectives"].values() for b in e.get("budgets", [])):
        key.append(Line2D([], [], color="0.3", linestyle="none", marker="X", markersize=8, markerfacecolor="white",
                          label="vertex outside the sampled sizes"))
    return key


def _legend_below(ax, extra: list | None = None, ncol: int = 2) -> None:
    """The panel's legend under its x label, outside the data."""
    handles, labels = ax.get_legend_handles_labels()
    for h in extra or []:
        handles.append(h)
        labels.append(h.get_label())
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=ncol, fontsize=7,
              frameon=False)


def _power_of_ten_label(v: float, _pos=None) -> str:
    """5e9 -> 5×10⁹ (mathtext), 1e10 -> 10¹⁰."""
    k = int(np.floor(np.log10(v) + 1e-9))
    m = v / 10 ** k
    return f"$10^{{{k}}}$" if abs(m - 1) < 1e-6 else f"${m:g}\\times10^{{{k}}}$"


def _plain_log_ticks(axis) -> None:
    """Decimal tick labels on a log axis (3.8, 200; not 3.8×10⁰): within a decade about five evenly spaced
    ticks, over more than a decade 1, 2 and 5 times the powers of ten (only powers beyond three decades)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    if lo <= 0 or hi <= lo:
        return
    decades = np.log10(hi / lo)
    if decades < 1:
        ticks = [t for t in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
        axis.set_major_locator(FixedLocator(ticks))
    else:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _multiplier_panel(ax, m: dict | None, xlabel: str) -> None:
    ax.set_title("MDM/ARM compute at equal loss")
    ax.set_xlabel(xlabel.replace("compute C", "ARM compute C"))
    ax.set_ylabel("compute multiplier")
    ax.grid(alpha=0.3, which="both")
    if not m:
        ax.text(0.5, 0.5, "needs IsoFLOP minima of both\nobjectives at 3 budgets", transform=ax.transAxes,
                ha="center", va="center", fontsize=9, color="0.4")
        return
    styles = {"law": ("C0", "o", "law: L* - E power laws"), "measured": ("C3", "D", "measured frontiers"),
              "pure": ("0.6", "s", "pure power laws (E = 0)")}
    for i, (k, (color, marker, label)) in enumerate(styles.items()):
        pts = [(b["compute"], b[k], b["interpolated"]) for b in m["budgets"] if b.get(k) and b[k]["value"]]
        if not pts:
            continue
        shift = 1.0 + 0.04 * (i - 1)  # side by side at each budget
        tr = m["trend"][k]["value"]
        label = label + (f", trend {tr:+.2f}" if tr is not None else "")
        for j, (c, est, interp) in enumerate(pts):
            ci = est["ci"]
            yerr = None if not ci else [[est["value"] - ci[0]], [ci[1] - est["value"]]]
            ax.errorbar([c * shift], [est["value"]], yerr=yerr, color=color, marker=marker, capsize=3,
                        markerfacecolor=color if interp else "white", linestyle="none",
                        label=label if j == 0 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.get_ylim()  # autoscale before the ticks are chosen
    _plain_log_ticks(ax.yaxis)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labelled at 1, 2, 5 x 10^k, never crowded
    ax.xaxis.set_major_formatter(FuncFormatter(_power_of_ten_label))
    ax.xaxis.set_minor_formatter(NullFormatter())
    _legend_below(ax, ncol=1)
    ax.get_legend().set_title("filled: interpolated (ARM loss within the MDM's measured minima)\n"
                              "hollow: extrapolated", prop={"size": 7})
