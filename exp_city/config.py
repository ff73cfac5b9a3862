"""Cityscapes with DUEB (values of the reference exp_city/config.py).

Edit values here, or override any key on the command line:
    python train.py --set labeled_ratio=8 nepochs=137 batch_size=16
Derived values (split file names, image counts, iterations per epoch, OHEM min_kept) follow.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from furnace.config import base_config, data_root  # noqa: E402

config = C = base_config()
C.dataset = "city"
C.dataset_path = data_root("city")
C.split_dir = "config_new/subset_train"
C.eval_source = "config_new/val.txt"
C.num_classes = 19
C.total_train_imgs = 2975
C.num_eval_imgs = 500
C.labeled_ratio = 16
C.nepochs = 150
C.batch_size = 6
C.lr = 0.01
C.dueb.unsup_weight = 5.0
C.image_height = C.image_width = 800
C.eval_crop_size = 800
C.sup_loss = "ohem"              # OHEM, thresh 0.7, min_kept 50000 x batch
C.ohem_class_weight = True       # the 19 Cityscapes class weights of CPCL
C.backbone = "resnet50"
C.pretrained_model = data_root("pytorch-weight", "resnet50_v1c.pth")
