"""Files written before the engine/config refactor still load: a pretraining checkpoint and a
RUN/config.yaml in the previous layout (the same keys, no config ``version``) resume without a
config-difference note and export; a config from a newer soco is refused in one line."""

from __future__ import annotations

import pytest
import torch
import yaml
from data_fixtures import make_photos, make_store, small_pretrain_config

from soco_pretrain.config import PretrainConfig, from_dict, to_dict
from soco_pretrain.engine.checkpoint import load_checkpoint
from soco_pretrain.errors import UserError
from soco_pretrain.train.loop import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

# The keys a pretraining checkpoint held before (train/loop.py's checkpoint state).
PREVIOUS_CHECKPOINT_KEYS = {
    "model", "optimizer", "step", "epoch", "batch_in_epoch", "rng", "scaler", "config", "world_size"
}  # fmt: skip


def _as_previous_format(run) -> None:
    """Rewrite the run's newest checkpoint and config.yaml as the previous code wrote them."""
    path = run / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    # the layout is unchanged but for total_steps (the schedule's length, read by the model card)
    assert set(state) == PREVIOUS_CHECKPOINT_KEYS | {"total_steps"}
    state.pop("total_steps")
    state["config"].pop("version")
    for newer in [*(run / "checkpoints").glob("step_*.pt"), *(run / "checkpoints").glob("*.sha256")]:
        newer.unlink()  # the previous code wrote no checksum files
    path.unlink()  # write it anew, as the previous code's checkpoint
    torch.save(state, path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.pop("version")
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.mark.slow  # ~17 s; the reader's no-config and old-layout cases are in tests/test_weights.py
def test_a_previous_format_run_resumes_and_exports(tmp_path, capsys):
    rel = make_photos(tmp_path / "images", side=96)[:2]
    store = make_store(tmp_path / "store", tmp_path / "images", rel, boxes_per_image=6)
    listed = tmp_path / "images" / "two.txt"  # beside the images, so paths match the store's
    listed.write_text("".join(f"{tmp_path / 'images' / p}\n" for p in rel))
    cfg = small_pretrain_config()
    run = tmp_path / "run"
    pretrain(cfg, listed, store, run, max_steps=1, progress=False)
    _as_previous_format(run)

    old_config = yaml.safe_load((run / "config.yaml").read_text())
    assert "version" not in old_config and from_dict(PretrainConfig, old_config).version == 1
    capsys.readouterr()
    summary = pretrain(from_dict(PretrainConfig, old_config), listed, store, run, max_steps=2, progress=False)
    out = capsys.readouterr().out
    assert summary.start_step == 1 and summary.step == 2
    assert "resumed from" in out and "config differs" not in out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["version"] == 1  # written anew

    from soco_pretrain.transfer.export import export

    export(run, "torchvision", out=tmp_path / "r50.pth")  # loads into torchvision's detector:
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    state = torch.load(tmp_path / "r50.pth", weights_only=True)
    missing, unexpected = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).load_state_dict(
        state, strict=False
    )
    assert not unexpected and not [k for k in missing if k.startswith("backbone.body.")]


def test_a_config_from_a_newer_version_is_one_line():
    data = to_dict(PretrainConfig())
    data["version"] = 2
    with pytest.raises(UserError, match="version") as info:
        from_dict(PretrainConfig, data)
    assert "\n" not in str(info.value)
