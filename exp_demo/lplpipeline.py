"""LPL's whole pipeline as the reference's run.py (stage 1, its test with image-level labels,
pseudo-label export, retrain, retest) with LPL's demo settings; a stopped run resumes in the
stage it stopped in. Examples: python lplpipeline.py ;
python lplpipeline.py --stages export retrain; torchrun --nproc_per_node=2 lplpipeline.py."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from furnace.pipelines.lpl import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(HERE, "demo"))
