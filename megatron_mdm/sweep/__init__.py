"""Scaling-law sweeps and training curves: plan, launch, collect, fit, plot (``mdm-sweep``, ``mdm-plot``).

- ``plan``: IsoFLOP runs from FLOP budgets (C = 6·N·D, N non-embedding parameters) and model shapes.
- ``launch``: the runs one after another on this machine (resumable) or a SLURM job array script.
- ``collect``: the final validation loss of each run (``metrics.jsonl``) into one CSV.
- ``fit``: IsoFLOP parabolas, power laws N*, D*, L* in C, the MDM/ARM compute multiplier and the
  Chinchilla parametric law, with bootstrap intervals.
- ``plot``: IsoFLOP and frontier figures; ``curves``: loss / lr / throughput curves of runs.
"""
