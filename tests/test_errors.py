"""The one exception hierarchy: every soco error is a SocoError with its exit status, and the
command line prints it as one line (exit 2 for the user's input, 1 for a failed run)."""

from __future__ import annotations

import importlib

import pytest

from soco_pretrain.cli import main
from soco_pretrain.errors import NonFiniteLossError, RunError, SocoError, UserError

STAGE_ERRORS = [
    ("soco_pretrain.images", "ImageError", UserError),
    ("soco_pretrain.coco_json", "CocoJsonError", UserError),
    ("soco_pretrain.proposals.store", "StoreError", UserError),
    ("soco_pretrain.proposals.generate", "GenerateError", UserError),
    ("soco_pretrain.presets", "PresetError", UserError),
    ("soco_pretrain.data.dataset", "DatasetError", UserError),
    ("soco_pretrain.data.manifest", "LeakError", UserError),
    ("soco_pretrain.data.proposal_sources", "BoxFileError", UserError),
    ("soco_pretrain.train.loop", "PretrainError", UserError),
    ("soco_pretrain.engine.checkpoint", "CheckpointError", UserError),
    ("soco_pretrain.engine.distributed", "DistributedError", RunError),
    ("soco_pretrain.transfer.coco", "CocoError", UserError),
    ("soco_pretrain.transfer.detector", "WeightsError", UserError),
    ("soco_pretrain.transfer.export", "ExportError", UserError),
    ("soco_pretrain.transfer.finetune", "FinetuneError", UserError),
    ("soco_pretrain.transfer.linear", "LinearError", UserError),
    ("soco_pretrain.evaluate.knn", "KnnError", UserError),
    ("soco_pretrain.evaluate.compare", "CompareError", UserError),
]


@pytest.mark.parametrize("module, name, kind", STAGE_ERRORS, ids=[n for _, n, _ in STAGE_ERRORS])
def test_every_stage_error_is_a_soco_error_of_its_kind(module, name, kind):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, kind) and issubclass(cls, SocoError)
    assert cls.exit_code == (2 if kind is UserError else 1)


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
