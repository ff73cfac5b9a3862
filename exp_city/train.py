"""Full DUEB: supervised + intersection/union pseudo labels + aleatoric + energy terms.

    python train.py [--set key=value ...] [-c last] [-d cpu|0]
    torchrun --nproc_per_node=N train.py
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="dueb", preset="full", description=__doc__)
