"""LPL stage 2: one network retrained with plain CE on the pixel labels and the pseudo labels
export.py wrote (--set train_source=<the exported list>), with LPL's demo settings (preset
'demo'). The whole pipeline: lplpipeline.py."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.engine.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main(HERE, method="lpl_retrain", preset="demo", description=__doc__)
