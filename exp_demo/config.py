"""The embedded demo: DUEB on the procedural shapes dataset (DATA/demo), CPU-sized.

`make demo` generates the data (python -m furnace.data.demo), trains train.py and evaluates.
ResNet-18 v1c from scratch at a quarter of the reference width (backbone_width 16, a 32-channel
decoder: a forward-backward takes about a quarter of the time of width 64), 1/80 labels (13
labelled, 987 unlabelled images) and 4 x 250 iterations at batch 8; every key can be
overridden with --set. README, "The demo", has the measurements behind these choices.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from furnace.config import base_config, data_root  # noqa: E402
from furnace.data.demo import DEMO_CLASSES  # noqa: E402

config = C = base_config()
C.dataset = "voc"                     # the demo uses the VOC layout
C.dataset_path = data_root("demo")
C.generate_demo_data = True           # build the demo dataset there on first use (~5 s)
C.split_dir = "subset_train_aug"
C.eval_source = "val.txt"
C.class_names = list(DEMO_CLASSES)
C.num_classes = len(DEMO_CLASSES)
C.total_train_imgs = 1000
C.num_eval_imgs = 200
C.labeled_ratio = 80                  # 13 labelled images: labels, not compute, are scarce
C.backbone = "resnet18"
C.pretrained_model = None             # no ImageNet weights: train from scratch
C.image_height = C.image_width = 64
C.train_scale_array = [0.5, 0.75, 1.0]
C.batch_size = 8
C.backbone_width = 16                 # the reference ResNet-18 is 64
C.head_channels = 32
C.lr = 0.05                           # 0.1 did no better in a 200-iteration probe
C.nepochs = 4
C.niters_per_epoch = 250
C.num_workers = 2
C.dueb.aleatoric.samples = 10
# From scratch the clean CE starts above 1, where the faithful aleatoric loss pushes it up
# (README, "The demo"), so the aleatoric terms start after the first epoch.
C.dueb.aleatoric.start_iter = 250
C.snapshot_iter = 1
C.eval_every = 2                      # validate after epochs 2 and 4 (log, tensorboard, best.pth)
C.snapshot_from = -1
C.snapshot_keep = 2
C.eval_crop_size = 128
C.eval_mode = "whole"
C.tb_images_every = 50

