"""Ablation: aleatoric terms only (no energy terms); the energy terms are not computed."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="dueb", preset="aleatoric", description=__doc__)
