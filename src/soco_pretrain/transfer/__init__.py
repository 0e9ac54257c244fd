"""Stage 5: transfer. ``export/`` (torchvision / Detectron2 / MMDetection weights + key
report, one module per target), ``finetune.py`` (Mask R-CNN fine-tune with COCO AP),
``linear.py`` (linear probe), ``warm_start.py`` (``--init``). The weights they read go through
the one weights layer below them, ``soco_pretrain.weights``.

Names are imported lazily (``soco_pretrain.transfer.export`` pulls in torch) so that importing
the package stays cheap. Add a module's public names to ``_LAZY`` as name -> (module, attribute).
The function ``export.export`` is ``export_weights`` here: the name ``export`` is the submodule.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    # export/
    **{
        name: ("export", name)
        for name in (
            "DEFAULT_WEIGHTS",
            "TARGETS",
            "WEIGHTS",
            "KeyReport",
            "ModuleCount",
            "EncoderWeights",
            "convert",
            "read_encoder",
            "resolve_checkpoint",
        )
    },
    "export_weights": ("export", "export"),
    # finetune.py and its parts (coco.py data, coco_eval.py AP, detector.py model + weights, shapes.py)
    "FinetuneOptions": ("finetune", "FinetuneOptions"),
    "run_finetune": ("finetune", "finetune"),  # the submodule is named finetune
    "load_coco": ("coco", "load_coco"),
    "coco_evaluate": ("coco_eval", "coco_evaluate"),
    **{name: ("detector", name) for name in ("WeightsError", "build_detector", "load_weights")},
    "make_shapes_set": ("shapes", "make_shapes_set"),
    # linear.py (linear probe)
    **{name: ("linear", name) for name in ("linear_probe", "LinearConfig", "load_backbone")},
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    return getattr(import_module(f".{module}", __name__), attribute)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
