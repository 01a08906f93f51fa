"""reglab's one entrypoint: `python train.py [group=option ...] [key=value ...] [-m]`. See README.md."""

import hydra
from omegaconf import DictConfig

from reglab.cli import main


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train(cfg: DictConfig) -> float:
    return main(cfg)


if __name__ == "__main__":
    train()
