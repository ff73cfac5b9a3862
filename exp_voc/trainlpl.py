"""LPL stage 1 (HybridNet + PseudoNet: class-aware CE and progressive cross training on a few
pixel labels and image-level labels; spec methods/LPL.md), with LPL's voc settings (preset
'voc': python trainlpl.py --print-config shows them). The whole pipeline: lplpipeline.py."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="lpl", preset="voc", description=__doc__)
