"""reglab: a Hydra-configured PyTorch template for studying how regularization fights overfitting."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# The process id in output directory names: two processes started in the same microsecond never share a directory.
# Registered on import so that launcher workers, which import reglab to run a job, can resolve it too.
OmegaConf.register_new_resolver("reglab_pid", os.getpid, use_cache=True, replace=True)
