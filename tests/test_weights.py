"""The one SoCo checkpoint reader (weights/read.py) that export, the fine-tune detector, the
linear probe and kNN read pretraining runs through.

The checkpoints carry every key of a real ``SoCoModel`` (FPN and C4, built on the meta device for
the names) with a small distinct tensor per key: the reader looks at names, not sizes, and each
value tells where it came from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soco_pretrain.config import PretrainConfig, to_dict
from soco_pretrain.engine.checkpoint import save_checkpoint
from soco_pretrain.errors import UserError
from soco_pretrain.model import SoCoModel
from soco_pretrain.weights import (
    WeightsError,
    load_weights_file,
    read_soco_checkpoint,
    resolve_checkpoint,
    soco_weights_of,
)


def _model_state(arch: str) -> dict[str, torch.Tensor]:
    """SoCoModel's state dict keys for ``arch``, each with a tiny tensor holding its index."""
    cfg = PretrainConfig()
    cfg.model.arch = arch
    with torch.device("meta"):  # names only
        keys = list(SoCoModel(cfg).state_dict())
    return {key: torch.tensor([float(i)]) for i, key in enumerate(keys)}


def _save(path: Path, arch: str, with_config: bool = True, step: int = 7) -> dict:
    cfg = PretrainConfig()
    cfg.model.arch = arch
    state = _model_state(arch)
    content = {"model": state, "step": step}
    if with_config:
        content["config"] = to_dict(cfg)
    save_checkpoint(path, content)
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    made = {}
    for arch in ("fpn", "c4"):
        run = root / f"run_{arch}"
        made[arch] = (run, _save(run / "checkpoints" / "last.pt", arch))
    return made


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_reads_both_networks_of_a_run_folder(checkpoints, arch):
    run, state = checkpoints[arch]
    found = read_soco_checkpoint(run)
    assert found.path == run / "checkpoints" / "last.pt"
    assert found.arch == arch and found.step == 7
    assert found.config["model"]["arch"] == arch
    online, target = _strip(state, "encoder."), _strip(state, "target_encoder.")
    assert set(found.online) == set(online) and set(found.target) == set(target)
    assert all(torch.equal(found.online[k], v) for k, v in online.items())
    assert all(torch.equal(found.target[k], v) for k, v in target.items())
    assert found.network("online") is found.online and found.network("target") is found.target
    # SoCoEncoder keys: the FPN encoder has the BackboneWithFPN body and the box head, C4 a plain ResNet
    if arch == "fpn":
        assert "backbone.body.conv1.weight" in found.online and "box_head.5.weight" in found.online
    else:
        assert "backbone.conv1.weight" in found.online and "backbone.layer4.2.bn3.weight" in found.online
        assert not any(k.startswith(("backbone.body.", "box_head.")) for k in found.online)
    # projector / predictor are in the whole model dict, never in an encoder
    assert any(k.startswith("predictor.") for k in found.model)
    assert not any(k.startswith(("projector.", "predictor.")) for k in found.online)


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_arch_without_a_saved_config_comes_from_the_keys(tmp_path, arch):
    _save(tmp_path / "bare.pt", arch, with_config=False)
    found = read_soco_checkpoint(tmp_path / "bare.pt")
    assert found.arch == arch and found.config is None


def test_run_folder_without_last_pt_uses_the_newest_numbered_checkpoint(tmp_path):
    run = tmp_path / "run"
    _save(run / "checkpoints" / "step_00000020.pt", "fpn", step=20)
    _save(run / "checkpoints" / "step_00000100.pt", "fpn", step=100)
    _save(run / "checkpoints" / "step_00000030.pt", "fpn", step=30)
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_00000100.pt"
    assert read_soco_checkpoint(run).step == 100


def test_plain_state_dicts_are_loaded_but_not_soco(tmp_path):
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    path, content = load_weights_file(tmp_path / "resnet.pth")
    assert path == tmp_path / "resnet.pth" and torch.equal(content["conv1.weight"], torch.zeros(2))
    assert soco_weights_of(content, path) is None
    with pytest.raises(WeightsError, match="not a SoCo checkpoint"):
        read_soco_checkpoint(tmp_path / "resnet.pth")


def _one_line_error(source) -> str:
    with pytest.raises(WeightsError) as err:
        read_soco_checkpoint(source)
    message = str(err.value)
    assert "\n" not in message and str(source) in message
    return message


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    assert issubclass(WeightsError, UserError)
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    assert "not a SoCo checkpoint (torch.load(weights_only=True) failed" in _one_line_error(tmp_path / "notes.pt")
    torch.save({"model": {"head.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    assert "no 'model' entry with encoder.* weights" in _one_line_error(tmp_path / "other.pt")
    (tmp_path / "empty_run").mkdir()
    assert "no checkpoint in" in _one_line_error(tmp_path / "empty_run")
    assert "no such run folder or checkpoint file" in _one_line_error(tmp_path / "nowhere")
    content = {"model": _model_state("fpn"), "config": {"model": {"arch": "vit"}}}
    save_checkpoint(tmp_path / "vit.pt", content)
    assert "unknown model.arch 'vit'" in _one_line_error(tmp_path / "vit.pt")
    # the general loader says "readable" (it also takes plain state dicts)
    with pytest.raises(WeightsError, match="notes.pt: not a readable checkpoint"):
        load_weights_file(tmp_path / "notes.pt")


def test_an_unreadable_pickle_is_one_line_without_repeated_words(tmp_path):
    (tmp_path / "broken.pkl").write_bytes(b"\x80\x02\x85.")  # a pickle that pops from an empty stack
    with pytest.raises(WeightsError) as exc:
        load_weights_file(tmp_path / "broken.pkl")
    message = str(exc.value)
    assert "broken.pkl: not a readable checkpoint (UnpicklingError" in message and "readable readable" not in message


def test_unknown_network_is_refused(checkpoints):
    found = read_soco_checkpoint(checkpoints["fpn"][0])
    with pytest.raises(WeightsError, match="online, target"):
        found.network("ema")


def test_detector_weights_come_through_the_reader(checkpoints):
    """detector.read_weights (fine-tune and kNN) maps the network the reader picked to torchvision keys."""
    from soco_pretrain.transfer.detector import read_weights

    run, state = checkpoints["fpn"]
    mapped, description = read_weights(run, "target")
    assert torch.equal(mapped["backbone.body.conv1.weight"], state["target_encoder.backbone.body.conv1.weight"])
    assert torch.equal(mapped["roi_heads.box_head.5.weight"], state["target_encoder.box_head.5.weight"])
    assert "target encoder" in description
    run, state = checkpoints["c4"]
    mapped, _ = read_weights(run / "checkpoints" / "last.pt")  # online by default
    assert torch.equal(mapped["backbone.body.layer4.0.conv1.weight"], state["encoder.backbone.layer4.0.conv1.weight"])
    assert not any(k.startswith(("roi_heads.", "backbone.fpn.")) for k in mapped)
