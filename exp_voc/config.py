"""PASCAL VOC 2012 + SBD aug with DUEB (values of the reference exp_voc/config.py).

Edit values here, or override any key on the command line:
    python train.py --set labeled_ratio=8 nepochs=34
Derived values (split file names, image counts, iterations per epoch) follow automatically.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from furnace.config import base_config, data_root  # noqa: E402

config = C = base_config()
C.dataset = "voc"
C.dataset_path = data_root("pascal_voc")   # DATA/pascal_voc (a nested pascal_voc/ is found too)
C.split_dir = "subset_train_aug"
C.eval_source = "val.txt"
C.num_classes = 21
C.total_train_imgs = 10582
C.num_eval_imgs = 1449
C.labeled_ratio = 4
C.nepochs = 40
C.batch_size = 8
C.lr = 0.005
C.dueb.unsup_weight = 1.0
C.image_height = C.image_width = 512
C.eval_crop_size = 512
C.sup_loss = "ce"
C.backbone = "resnet50"
# The reference loads ResNet-101 v1c weights into the ResNet-50 (QUIRK 10): the shared keys
# (stem, layer1-2, the first 6 blocks of layer3, layer4) match. Point this at
# resnet50_v1c.pth for a consistent backbone.
C.pretrained_model = data_root("pytorch-weight", "resnet101_v1c.pth")
