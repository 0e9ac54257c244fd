"""Run folders: one run at a time (a lock), never two runs mixed (--resume none refuses a folder
holding checkpoints unless --overwrite, which moves the old run aside), and a resume that would
continue with other settings or other starting weights is refused in one line unless accepted."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import make_photos, make_store, small_pretrain_config

from soco_pretrain.cli import main
from soco_pretrain.engine.metrics import read_metrics
from soco_pretrain.errors import UserError
from soco_pretrain.runfolder import file_digest, locked, start_fresh
from soco_pretrain.train.loop import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(*extra: str):
    """The tests' small pretraining setting on a ResNet-18 with a small head: what a run folder
    does does not depend on the network, and these runs are the file's cost."""
    return small_pretrain_config("model.backbone=resnet18", "model.head_dim=256", "model.proj_hidden=512", *extra)


@pytest.fixture(scope="module")
def two_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("runfolder")
    rel = make_photos(root / "images", side=96)[:2]
    store = make_store(root / "store", root / "images", rel, boxes_per_image=6)
    listed = root / "images" / "two.txt"  # beside the images, so paths match the store's
    listed.write_text("".join(f"{root / 'images' / p}\n" for p in rel))
    return listed, store


def test_a_second_run_on_a_busy_folder_stops_in_one_line(tmp_path, two_photos, capsys):
    listed, store = two_photos
    run = tmp_path / "run"
    with locked(run, "pretrain"):  # another run holds the folder
        with pytest.raises(UserError, match="another soco run is using this folder now .soco pretrain, pid"):
            pretrain(_config(), listed, store, run, max_steps=1, progress=False)
        status = main(["pretrain", "--preset", "tiny", "--images", str(listed), "--proposals", str(store),
                       "--out", str(run), "--max-steps", "1"])  # fmt: skip
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and "another soco run is using this folder" in err
    assert not (run / "checkpoints").exists()  # nothing was trained or written by the refused runs


def test_resume_none_refuses_then_overwrite_moves_the_old_run_aside(tmp_path, two_photos):
    listed, store = two_photos
    run = tmp_path / "run"
    pretrain(_config(), listed, store, run, max_steps=1, progress=False)
    old_weights = file_digest(run / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="--resume none would mix two runs"):
        pretrain(_config(), listed, store, run, max_steps=1, resume="none", progress=False)
    assert file_digest(run / "checkpoints" / "last.pt") == old_weights  # untouched
    summary = pretrain(_config(), listed, store, run, max_steps=1, resume="none", progress=False, overwrite=True)
    aside = tmp_path / "run.old-1"
    assert summary.start_step == 0 and file_digest(aside / "checkpoints" / "last.pt") == old_weights
    assert [r["step"] for r in read_metrics(run)] == [1] and [r["step"] for r in read_metrics(aside)] == [1]


def test_start_fresh_numbers_the_folders_it_moves_aside(tmp_path):
    run = tmp_path / "r"
    for n in (1, 2):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_text(str(n))
        assert start_fresh(run, overwrite=True, command="test") == tmp_path / f"r.old-{n}"
    assert (tmp_path / "r.old-2" / "checkpoints" / "last.pt").read_text() == "2"
    assert start_fresh(tmp_path / "empty", overwrite=False, command="test") is None  # nothing to protect


def test_resume_with_other_training_settings_is_refused_unless_accepted(tmp_path, two_photos):
    listed, store = two_photos
    run = tmp_path / "run"
    pretrain(_config("train.epochs=3"), listed, store, run, max_steps=1, progress=False)
    with pytest.raises(UserError, match=r"made with other settings \(train.epochs\).*--accept-changes"):
        pretrain(_config("train.epochs=5"), listed, store, run, max_steps=2, progress=False)
    # how a run reports is free to change; what it trains is not, unless accepted
    free = pretrain(_config("train.epochs=3", "train.log_every=2"), listed, store, run, max_steps=2,
                    progress=False)  # fmt: skip
    assert free.start_step == 1 and free.step == 2
    accepted = pretrain(_config("train.epochs=5"), listed, store, run, max_steps=3, progress=False,
                        accept_changes=True)  # fmt: skip
    assert accepted.start_step == 2 and accepted.total_steps == 5


def test_resume_from_a_non_pretraining_checkpoint_is_one_line(tmp_path, two_photos):
    listed, store = two_photos
    export = tmp_path / "export.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, export)

    with pytest.raises(UserError, match="not a soco pretrain checkpoint"):
        pretrain(_config(), listed, store, tmp_path / "run", resume=str(export), progress=False)


def test_finetune_resume_from_other_weights_is_refused(tmp_path, capsys):
    from conftest import small_photo
    from torchvision.models import resnet50

    from soco_pretrain.transfer.finetune import finetune
    from soco_pretrain.transfer.shapes import make_shapes_set

    photos = {n: small_photo(n, 96) for n in ("astronaut", "coffee")}
    train = make_shapes_set(photos, tmp_path / "set", seed=0)
    data = (train, tmp_path / "set" / "images", train, tmp_path / "set" / "images")
    tiny = {"batch_size": 1, "train_sizes": (96,), "max_size": 128, "roi_batch": 16, "test_proposals": 10,
            "detections": 5, "workers": 0, "progress": False, "precise_bn": 0}  # fmt: skip
    out = tmp_path / "ft"
    finetune(None, *data, out, max_iters=1, **tiny)
    torch.manual_seed(0)
    weights = tmp_path / "r50.pth"
    torch.save(resnet50(weights=None).state_dict(), weights)
    with pytest.raises(UserError, match=r"started from random init \(--weights none\), not .*r50.pth "
                       r"\(sha256 [0-9a-f]{12}\).*--accept-changes") as refused:  # fmt: skip
        finetune(weights, *data, out, max_iters=2, **tiny)
    assert "None" not in str(refused.value)  # random init has no file, so no digest: said, not "sha256 None"
    images = str(tmp_path / "set" / "images")
    argv = ["finetune", "--weights", "none", "--train-json", str(train), "--train-images", images,
            "--val-json", str(train), "--val-images", images, "--out", str(out), "--resume", "none"]  # fmt: skip
    status = main(argv)
    assert status == 2 and "--resume none would mix two runs" in capsys.readouterr().err


def test_a_refused_command_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(UserError, match="bad input"), locked(out, "finetune"):
        raise UserError("bad input")  # refused after the lock was taken
    assert not (tmp_path / "new").exists()  # neither OUT nor the parent it made
    kept = tmp_path / "kept"  # a folder that was there: kept, without the lock it got
    kept.mkdir()
    with pytest.raises(UserError), locked(kept, "finetune"):
        raise UserError("bad input")
    assert kept.is_dir() and list(kept.iterdir()) == []
    with pytest.raises(UserError), locked(out, "finetune"):  # a run that wrote something keeps it all
        (out / "metrics.jsonl").write_text("{}\n")
        raise UserError("stopped")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl"]
    with locked(tmp_path / "done", "finetune"):  # a run that ends normally keeps its lock file
        pass
    assert [p.name for p in (tmp_path / "done").iterdir()] == [".lock"]


def test_finetune_refused_for_bad_weights_leaves_no_out(tmp_path, capsys):
    from conftest import small_photo

    from soco_pretrain.transfer.shapes import make_shapes_set

    train = make_shapes_set({"coffee": small_photo("coffee", 96)}, tmp_path / "set", seed=0)
    notes = tmp_path / "notes.pth"
    notes.write_text("not weights")
    images = str(tmp_path / "set" / "images")
    out = tmp_path / "ft"
    argv = ["finetune", "--weights", str(notes), "--train-json", str(train), "--train-images", images,
            "--val-json", str(train), "--val-images", images, "--out", str(out), "--fraction", "0.5"]  # fmt: skip
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "notes.pth" in err and err.count("\n") == 1, err
    assert not out.exists()  # the lock was taken, then the weights were refused: nothing left
