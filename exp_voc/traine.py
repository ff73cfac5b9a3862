"""Ablation: energy terms only (no aleatoric terms); the aleatoric terms are not computed."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="dueb", preset="energy", description=__doc__)
