"""Train a byte-level BPE tokenizer with the MDM special tokens (the same code as ``mdm-tokenizer train``).

    python tokenizer/train_tokenizer.py --input corpus.jsonl --vocab-size 32000 --output tok/
"""

import sys

from megatron_mdm.cli.tokenizer import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
