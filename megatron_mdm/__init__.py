"""megatron-mdm: masked diffusion language models on Megatron-core.

Importing the package has no side effects; see ``megatron_mdm.runtime`` to start a job.
"""

__version__ = "0.1.0"
