"""The one exception hierarchy: every soco error is a SocoError with its exit status, and the
command line prints it as one line (exit 2 for the user's input, 1 for a failed run)."""

from __future__ import annotations

import importlib

import pytest

from soco_pretrain.cli import main
from soco_pretrain.errors import NonFiniteLossError, RunError, SocoError, UserError

# The subclasses left: each is told apart by type somewhere (ImageError: an unreadable image is
# skipped; ConfigError: relocated with its key) or carries data (DatasetError.paths,
# LeakError.pairs). The others were folded into UserError / PathError / RunError.
STAGE_ERRORS = [
    ("soco_pretrain.images", "ImageError", UserError),
    ("soco_pretrain.config", "ConfigError", UserError),
    ("soco_pretrain.data.dataset", "DatasetError", UserError),
    ("soco_pretrain.data.manifest", "LeakError", UserError),
    ("soco_pretrain.train.loop", "UserError", UserError),
    ("soco_pretrain.engine.checkpoint", "CheckpointError", UserError),
    ("soco_pretrain.engine.distributed", "DistributedError", RunError),
    ("soco_pretrain.transfer.detector", "WeightsError", UserError),
    ("soco_pretrain.transfer.export", "UserError", UserError),
    ("soco_pretrain.transfer.finetune", "UserError", UserError),
    ("soco_pretrain.transfer.linear", "UserError", UserError),
    ("soco_pretrain.evaluate.knn", "UserError", UserError),
]

FOLDED = [
    ("soco_pretrain.coco_json", "CocoJsonError"),
    ("soco_pretrain.proposals.store", "StoreError"),
    ("soco_pretrain.proposals.generate", "GenerateError"),
    ("soco_pretrain.presets", "PresetError"),
    ("soco_pretrain.data.proposal_sources", "BoxFileError"),
    ("soco_pretrain.transfer.coco", "CocoError"),
    ("soco_pretrain.evaluate.compare", "CompareError"),
    ("soco_pretrain.train.speed", "SpeedSettingError"),
]


@pytest.mark.parametrize("module, name, kind", STAGE_ERRORS, ids=[n for _, n, _ in STAGE_ERRORS])
def test_every_stage_error_is_a_soco_error_of_its_kind(module, name, kind):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, kind) and issubclass(cls, SocoError)
    assert cls.exit_code == (2 if kind is UserError else 1)


@pytest.mark.parametrize("module, name", FOLDED, ids=[n for _, n in FOLDED])
def test_folded_classes_are_gone(module, name):
    """Nothing caught these by type: their raise sites use the bases now."""
    assert not hasattr(importlib.import_module(module), name)


def test_exit_codes_and_one_line(monkeypatch, capsys):
    import soco_pretrain.cli as cli

    def fail_with(exc):
        def cmd(args):
            raise exc

        return cmd

    for exc, code in [(UserError("a.json: bad\nvalue"), 2), (NonFiniteLossError("non-finite loss (nan)"), 1)]:
        monkeypatch.setattr(cli, "cmd_demo", fail_with(exc))
        assert main(["demo", "--out", "x"]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("soco: error: ")
    monkeypatch.setattr(cli, "cmd_demo", fail_with(KeyError("a bug")))
    with pytest.raises(KeyError):  # not a soco error: a bug keeps its traceback
        main(["demo", "--out", "x"])


def test_an_error_from_a_loader_worker_keeps_only_its_own_message():
    """DataLoader workers re-raise with the worker's traceback in the message; one line is the cause."""
    from torch._utils import ExceptionWrapper

    try:
        raise UserError("data.views.v1_size=0: must be at least 1")
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as info:
        wrapped.reraise()
    assert "Original Traceback" in str(info.value)  # what torch hands back
    assert info.value.one_line() == "data.views.v1_size=0: must be at least 1"


def test_a_library_notice_reaches_the_command_output(tmp_path, capsys):
    """A log.info notice of the data module (never shown before: nothing configured logging)
    appears in the command's output as a plain line."""
    import json

    from data_fixtures import make_photos

    rel = make_photos(tmp_path / "images", names=("astronaut", "coffee"), side=64)
    # a COCO box file with boxes for the first image only: the second uses the whole image
    boxes = {
        "images": [{"id": k + 1, "file_name": name} for k, name in enumerate(rel)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 32, 32]}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    args = ["show", "views", "--images", str(tmp_path / "images"), "-o", str(tmp_path / "pics"), "--num", "1"]
    sets = ["views.proposal_source=coco", f"views.proposal_json={tmp_path / 'boxes.json'}"]
    sets.append("views.no_proposals=whole_image")
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert "1 images without proposals use the whole image as their proposal\n" in out.splitlines(keepends=True)
