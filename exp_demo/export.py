"""Write pseudo labels of a checkpoint for a training list (resumable):
python export.py -e CKPT --list LIST --out DIR [--keep-labelled LIST] [-d cpu|0|0,1]
[--no-class-mask] [--set key=value ...]"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.eval.export import main  # noqa: E402

if __name__ == "__main__":
    main(HERE)
