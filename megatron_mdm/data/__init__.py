"""Tokenized, packed pretraining data: shard format, readers, writer, prepare, loaders.

``format`` owns the on-disk schema; ``readers`` stream raw text; ``writer`` packs and writes shards;
``prepare`` runs the pipeline (processes, MPI ranks, resume); ``loader`` feeds training; ``sft`` feeds
supervised finetuning. Submodules are imported explicitly (``from megatron_mdm.data.loader import ...``)
so that importing the package stays cheap.
"""
