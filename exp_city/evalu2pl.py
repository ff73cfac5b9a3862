"""Evaluate U2PL (and U2PL SupOnly) checkpoints of this folder with U2PL's city settings
(its network and evaluation protocol; preset 'city'), teacher weights where the run used
the teacher: python evalu2pl.py [-e last|N|a-b|a-|x.pth] [-d cpu|0|0,1] [-s] [--set ...]"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    main(HERE, method="u2pl", preset="city")
