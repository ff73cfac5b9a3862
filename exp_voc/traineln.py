"""ELN (mean teacher with error-localisation-filtered pseudo labels; spec methods/ELN.md),
with ELN's voc settings (preset 'voc': python traineln.py --print-config shows them)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="eln", preset="voc", description=__doc__)
