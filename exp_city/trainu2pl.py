"""U2PL (mean teacher, entropy-filtered pseudo labels, unreliable-pixel contrastive loss),
with U2PL's city settings (preset 'city': python trainu2pl.py --print-config shows them)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="u2pl", preset="city", description=__doc__)
