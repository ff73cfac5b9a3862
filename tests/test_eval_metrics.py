"""Confusion histogram, IoU, mIoU, pixel accuracy and the result text (REFERENCE 5.4, 5.5)."""
import math

import numpy as np
import pytest
import torch

from furnace.eval.metrics import (ConfusionMatrix, compute_metrics, confusion_histogram,
                                  format_results)


def test_histogram_by_hand_rows_gt_cols_pred_and_255_ignored():
    gt = torch.tensor([[0, 0, 1, 255],
                       [2, 1, 1, 7]])          # 7 is out of range for C=3: left out too
    pred = torch.tensor([[0, 1, 1, 2],
                         [2, 0, 1, 0]])
    h = confusion_histogram(pred, gt, 3)
    want = np.array([[1, 1, 0],     # gt 0: pred 0, pred 1
                     [1, 2, 0],     # gt 1: pred 1, pred 0, pred 1
                     [0, 0, 1]])    # gt 2: pred 2
    np.testing.assert_array_equal(h.numpy(), want)
    assert h.dtype == torch.int64


def test_metrics_by_hand_with_absent_class():
    # class 3 appears in neither GT nor prediction: IoU NaN, skipped by nanmean
    hist = np.array([[5, 1, 0, 0],
                     [2, 3, 0, 0],
                     [0, 1, 4, 0],
                     [0, 0, 0, 0]])
    m = compute_metrics(hist)
    iou = [5 / (6 + 7 - 5), 3 / (5 + 5 - 3), 4 / (5 + 4 - 4)]
    np.testing.assert_allclose(m["iou"][:3], iou, rtol=1e-15)
    assert math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx(np.mean(iou), rel=1e-15)
    assert m["miou_no_back"] == pytest.approx(np.mean(iou[1:]), rel=1e-15)
    assert m["pixel_acc"] == pytest.approx(12 / 16, rel=1e-15)
    assert (m["labeled"], m["correct"]) == (16, 12)


def test_predicted_but_absent_class_counts_as_zero_iou():
    hist = np.array([[3, 1], [0, 0]])       # class 1 predicted once, never in GT
    m = compute_metrics(hist)
    np.testing.assert_allclose(m["iou"], [0.75, 0.0])
    assert m["miou"] == pytest.approx(0.375)


def test_empty_histogram_gives_nan_without_warnings():
    with np.errstate(all="raise"):
        m = compute_metrics(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_acc"])


def test_running_matrix_accumulates_and_merges():
    rng = np.random.RandomState(0)
    cm, parts = ConfusionMatrix(5), [ConfusionMatrix(5), ConfusionMatrix(5)]
    ref = np.zeros((5, 5), dtype=np.int64)
    for i in range(6):
        gt = rng.randint(0, 5, (7, 9))
        gt[rng.rand(7, 9) < 0.2] = 255
        pred = rng.randint(0, 5, (7, 9))
        cm.update(torch.from_numpy(pred), gt.astype(np.uint8))
        parts[i % 2].update(torch.from_numpy(pred), torch.from_numpy(gt))
        k = gt != 255
        np.add.at(ref, (gt[k], pred[k]), 1)
    np.testing.assert_array_equal(cm.numpy(), ref)
    merged = ConfusionMatrix(5)
    merged.merge(parts[0])
    merged.merge(parts[1].numpy())
    np.testing.assert_array_equal(merged.numpy(), ref)
    assert cm.compute()["pixel_acc"] == pytest.approx(np.trace(ref) / ref.sum())


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        confusion_histogram(torch.zeros(3, 4, dtype=torch.long), torch.zeros(4, 3), 2)


def test_result_text_format():
    iou = np.array([0.5, 0.25, np.nan])
    text = format_results(iou, np.nanmean(iou), np.nanmean(iou[1:]), 0.875,
                          ["background", "cat", "dog"])
    lines = text.split("\n")
    assert lines[0] == "1 background\t50.000%"
    assert lines[1] == "2 cat\t25.000%"
    assert lines[2] == "3 dog\tnan%"
    assert set(lines[3]) == {"-"}
    assert lines[4] == "mIou: 37.500%     mIoU(no_back): 25.000%      mACC: 87.500%"
    # wrong number of names: generic names
    assert format_results(iou, 0, 0, 0, ["a"]).startswith("1 class_0\t")
