"""Pretrain a masked diffusion LM (or the ARM baseline) with Megatron-core: the job entry point as a script.

The same program as ``mdm-pretrain`` (``megatron_mdm/cli/pretrain.py``, which ``--help`` describes); this file
only calls it, as Megatron-LM's ``pretrain_gpt.py`` calls its library. Its own launcher, or one worker under
torchrun, srun or mpirun:

    python pretrain/pretrain_mdm.py --nproc-per-node 8 --config examples/configs/smdm_1.1b.yaml \
        --tensor-model-parallel-size 2 --data-path 0.7 /data/a 0.3 /data/b --save runs/x
    torchrun --nproc-per-node 8 pretrain/pretrain_mdm.py --config ...
"""

import sys

from megatron_mdm.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main(prog="pretrain_mdm.py"))
