"""Evaluation: sliding-window inference, metrics, checkpoint selection, composites, CLI.

Public API::

    sliding_windows(h, w, crop, stride_rate=2/3) -> WindowGrid
    SegEvaluator(model, num_classes, *, crop_size, ...).predict(image) -> Prediction
    SegEvaluator.from_config(model, C, device='cpu', with_var=False)
    scaled_size(h, w, scale) -> (h', w')  (OpenCV's size, half to even)
    restricted_argmax(score [C,H,W], classes [C]) -> int64 [H, W]
    dense_crf(image uint8 [H,W,3], prob [C,H,W], iters=1, gaussian=(3, 3),
              bilateral=(32, 13, 10), clip=1e-5) -> Q [C,H,W];  crf_image(normalized, mean, std)
    confusion_histogram(pred, label, num_classes) -> int64 [C, C]
    ConfusionMatrix(num_classes, device), compute_metrics(hist), format_results(...)
    resolve_checkpoints(spec, snapshot_dir) -> [Path]
    colorize(label, palette), make_composite(image, pred, label, palette, var=None,
                                             errors=False)
    UncertaintyMeter(num_classes, device).update(logits, var, label, logits2=None)
        .compute() -> AUROC/AUPR of error detection per score, ECE, reliability bins
    format_uncertainty(result), save_reliability_diagram(result, path)
    furnace.eval.cli.main(exp_dir, argv=None) -> [result dict]   (the eval.py command line)
    furnace.eval.cli.run(C, epochs, devices, ...) -> [result dict]
    furnace.eval.loop.evaluate_model(model, C, device, uncertainty=False) -> metrics dict
        (validation in training, with furnace.eval.loop.validation_config(C))
    furnace.data.image_labels.image_level_label(mask, num_classes) -> float32 [C] (the rule)
    furnace.eval.export.export_pseudo_labels(C, checkpoint_path, list_file, out_dir, *,
        devices=('cpu',), class_mask=True, keep_labelled=None) -> written list path
    furnace.eval.export.main(exp_dir, argv=None)             (the export.py command line)
"""
# Names are imported on first use (as furnace.methods does), so that importing
# furnace.eval.cli for ``eval.py --help`` does not import torch.
_LAZY = {
    "Prediction": "evaluator", "SegEvaluator": "evaluator", "WindowGrid": "evaluator",
    "normalization_lut": "evaluator", "sliding_windows": "evaluator",
    "restricted_argmax": "evaluator", "scaled_size": "evaluator",
    "crf_image": "crf", "dense_crf": "crf",
    "ConfusionMatrix": "metrics", "compute_metrics": "metrics",
    "confusion_histogram": "metrics", "format_results": "metrics",
    "available_epochs": "snapshots", "checkpoint_epoch": "snapshots",
    "resolve_checkpoints": "snapshots", "UncertaintyMeter": "uncertainty",
    "format_uncertainty": "uncertainty", "save_reliability_diagram": "uncertainty",
    "colorize": "visualize", "error_to_color": "visualize", "get_palette": "visualize",
    "make_composite": "visualize", "variance_to_color": "visualize",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConfusionMatrix", "Prediction", "SegEvaluator", "UncertaintyMeter", "WindowGrid",
    "available_epochs", "checkpoint_epoch", "colorize", "compute_metrics", "crf_image",
    "dense_crf", "restricted_argmax", "scaled_size",
    "confusion_histogram", "error_to_color", "format_results", "format_uncertainty",
    "get_palette", "make_composite", "normalization_lut", "resolve_checkpoints",
    "save_reliability_diagram", "sliding_windows", "variance_to_color",
]
