"""Scaling-law sweeps and training curves: plan, launch, collect, fit, plot (``mdm-sweep``, ``mdm-plot``).

- ``plan``: IsoFLOP runs from FLOP budgets (C = 6·N·D, N non-embedding parameters) and model shapes, in
  groups (other budgets per objective, tagged seed / learning-rate variants).
- ``launch``: the runs one after another on this machine (resumable; ``--part`` for launches side by side)
  or a SLURM job array script.
- ``collect``: the final validation loss of each run (``metrics.jsonl``) into one CSV, with the full FLOP
  count and the epochs of data seen.
- ``fit``: all fits with one bootstrap over the whole pipeline: ``checks`` (usable rows, variant runs),
  ``isoflop`` (parabolas, power laws of N*, D*, L*, L* - E), ``parametric`` (Chinchilla's L(N, D), its E),
  ``multiplier`` (MDM/ARM compute at equal loss, from the laws and from the measured frontiers),
  ``bootstrap`` (scipy.stats.bootstrap over strata).
- ``plot``: IsoFLOP curves, frontiers and the multiplier; ``curves``: loss / lr / throughput curves of runs.
"""
