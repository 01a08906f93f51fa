"""reglab: a Hydra-configured PyTorch template for studying how regularization fights overfitting."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# MKL (torch's CPU matmuls) may pick its kernel by the memory alignment of the operands, and a stacked member's
# slice sits at another offset than a lone run's tensor: without this, a member of a stack rounded differently from
# its lone run (seen in the cnn1d output layer's weight gradient at odd member positions). Strict conditional
# numerical reproducibility makes the results independent of alignment (and of the thread count, for the functions
# it covers). MKL reads it at its first call, so reglab sets it on import; a user's own value wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# The process id in output directory names: two processes started in the same microsecond never share a directory.
# Registered on import so that launcher workers, which import reglab to run a job, can resolve it too.
OmegaConf.register_new_resolver("reglab_pid", os.getpid, use_cache=True, replace=True)
