"""Evaluate checkpoints of this experiment: python eval.py [-e last|N|a-b|a-|x.pth] [-d cpu|0|0,1]
[-v] [-s] [-p PATH] [--set key=value ...]"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    main(HERE)
