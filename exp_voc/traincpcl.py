"""Baseline: CPCL (supervised + intersection/union pseudo labels, no aleatoric or energy)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="dueb", preset="cpcl", description=__doc__)
