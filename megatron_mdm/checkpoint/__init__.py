"""Checkpoints of a training run: the run directory's layout, distributed save/load, integrity, optimizer state.

* ``layout``: the files of a run directory (iteration directories, the marker, saves in progress, pruning,
  config.yaml, metrics.jsonl, tensorboard/) and ``CheckpointError``; plain file-system work, no torch;
* ``checkpointing``: save and load with Megatron ``dist_checkpointing`` (model, optimizer, scheduler, RNG,
  the loader's state), atomic commits, the checks made on load;
* ``integrity``: checksums of every file, verified on load and before conversion;
* ``optimizer``: the optimizer-state details that make a resumed run bit-exact.

Importing the package imports none of them (``compat`` reads ``layout`` without pulling in Megatron).
"""
