"""Training a run: the one loop for both objectives, the run's data, and what it logs.

* ``loop``: ``pretrain(cfg)`` (init, data, model, resume, train, save) and the ``Trainer`` behind it;
* ``data``: the tokenizer and the train/validation loaders of a run, built from ``cfg.data``;
* ``metrics``: metrics.jsonl and TensorBoard records, throughput and MFU.

The command line that starts a job is ``megatron_mdm.cli.pretrain``; ``megatron_mdm.launch`` builds its
command for torchrun and the other launchers. Importing this package imports none of the modules.
"""
