"""Tokenize, pack and shard a corpus; the multi-node entry point (the same code as ``mdm-data prepare``).

    mpirun -n R python data_prep/prepare_data.py --input 'raw/*.jsonl.zst' --tokenizer tok/ \
        --output shards/ --seq-length 2048 --workers 8

Ranks split the input files deterministically (the output directory must be on a shared file system);
rank 0 writes the manifest. Without mpirun it runs as one rank.
"""

import sys

from megatron_mdm.cli.data import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
