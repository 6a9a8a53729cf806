"""Tokenized, packed pretraining data: shard format, readers, writer, prepare, order, loaders.

``format`` owns the on-disk schema; ``readers`` stream raw text; ``writer`` packs and writes shards;
``prepare`` runs the pipeline (processes, MPI ranks, resume); ``order`` maps training-stream positions
to samples (blend, global shuffle, data-parallel split); ``shards`` reads samples by number; ``loader``
feeds training and validation; ``sft`` feeds supervised finetuning. Submodules are imported explicitly
(``from megatron_mdm.data.loader import ...``) so that importing the package stays cheap.
"""
