"""U2PL's SupOnly baseline: its network without the representation head, labelled data only,
with U2PL's demo settings (preset 'demo')."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="u2pl_suponly", preset="demo", description=__doc__)
