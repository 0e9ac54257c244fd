"""The one weights layer (soco_pretrain.weights): every command that loads weights reads and
reports a file the same way, under the policy it documents.

Oracles: the source models' own tensors (a seeded torchvision ResNet-18 with non-default BN
statistics), compared by name after loading; hand-written expected reports for a toy target.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torchvision

from soco_pretrain.config import ModelConfig
from soco_pretrain.weights import LoadReport, Target, WeightsError, check, match, refusal

pytestmark = pytest.mark.usefixtures("one_thread")

BODY_KEY = "layer4.1.conv2.weight"  # the tensor the "wrong shape" file gets wrong


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """A ResNet-18 state dict file (fc included, as torchvision saves it) and its tensors."""
    torch.manual_seed(3)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # a load of BN buffers shows only if they differ from the defaults
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("layer") / "r18.pth"
    torch.save(state, path)
    return path, state


def _reports(path) -> dict[str, LoadReport]:
    """The load report of ``path`` through the reader of each command (library calls)."""
    from soco_pretrain.evaluate.knn import build_encoder
    from soco_pretrain.transfer.detector import build_detector, load_weights
    from soco_pretrain.transfer.linear import read_backbone
    from soco_pretrain.transfer.warm_start import prepare_init

    _, info = build_encoder(path)  # soco knn --weights
    detector = build_detector(3, masks=False, backbone="resnet18")
    finetune = load_weights(detector, path)  # soco finetune --weights
    _, _, linear = read_backbone(path)  # soco linear --weights
    init = prepare_init(path, ModelConfig(arch="fpn", backbone="resnet18"))  # soco pretrain --init
    return {"knn": info["report"], "finetune": finetune, "linear": linear, "init": init}


def _file_lines(report: LoadReport) -> list[list[str]]:
    """The lines of format() about the file itself (its body row, mismatches, unused keys)."""
    keep = ("backbone.body", "shape mismatch", "unused keys")
    return [line.split() for line in report.format().splitlines() if line.strip().startswith(keep)]


def test_one_file_gives_the_same_report_in_every_command(resnet18):
    path, source = resnet18
    body = [k for k in source if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    reports = _reports(path)
    for name, report in reports.items():
        assert report.modules["backbone.body"] == (len(body), len(body)), name
        assert report.unused == ["fc.weight", "fc.bias"] and report.mismatched == [], name
        assert len(report.state) == len(source) - 2, name  # every body tensor, counters included
        for key, value in report.state.items():  # the file's own tensors, by torchvision name
            assert torch.equal(value, source[key.split("body.")[-1].removeprefix("backbone.")]), (name, key)
    lines = {name: _file_lines(report) for name, report in reports.items()}
    assert lines["knn"] == lines["finetune"] == lines["linear"] == lines["init"]
    assert lines["knn"] == [
        ["backbone.body", f"{len(body)}/{len(body)}", "loaded"],
        ["unused", "keys", "in", "the", "file:", "2", "(fc.weight,", "fc.bias)"],
    ]


def test_a_wrong_shaped_tensor_under_each_commands_policy(resnet18, tmp_path):
    from soco_pretrain.errors import UserError
    from soco_pretrain.evaluate.knn import build_encoder
    from soco_pretrain.transfer.detector import build_detector, load_weights
    from soco_pretrain.transfer.linear import load_backbone
    from soco_pretrain.transfer.warm_start import InitError, prepare_init

    _, source = resnet18
    state = dict(source)
    state[BODY_KEY] = torch.zeros(512, 512, 1, 1)  # a 1x1 conv where ResNet-18 has a 3x3
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    key = f"backbone.body.{BODY_KEY}"
    # knn and linear evaluate a frozen encoder: refused, naming the tensor
    for error, call in ((UserError, lambda: build_encoder(path)), (UserError, lambda: load_backbone(path))):
        with pytest.raises(error) as err:
            call()
        assert str(path) in str(err.value) and key in str(err.value) and "\n" not in str(err.value)
    # warm start: refused (body incomplete) unless --init-partial
    with pytest.raises(InitError, match="layer4"):
        prepare_init(path, ModelConfig(arch="fpn", backbone="resnet18"))
    partial = prepare_init(path, ModelConfig(arch="fpn", backbone="resnet18", init_partial=True))
    assert partial.mismatched == [key]
    # fine-tuning (partial): the rest loads, the tensor keeps its init and is listed
    detector = build_detector(3, masks=False, backbone="resnet18")
    before = detector.state_dict()[key].clone()
    report = load_weights(detector, path)
    n, total = report.modules["backbone.body"]
    assert (n, total - 1) == (total - 1, n) and report.mismatched == [key] and key in report.format()
    assert torch.equal(detector.state_dict()[key], before)
    assert torch.equal(detector.state_dict()["backbone.body.layer4.1.conv1.weight"], source["layer4.1.conv1.weight"])
    assert partial.modules["backbone.body"] == report.modules["backbone.body"]  # the same counts


# ---------------------------------------------------------------- the policies on a toy target


TOY = Target(
    "the toy",
    {
        "backbone.body.a": torch.Size([2]),
        "backbone.body.b": torch.Size([3]),
        "backbone.body.bn.num_batches_tracked": torch.Size([]),
        "backbone.fpn.c": torch.Size([1]),
    },
    lambda key: key,
)


def _toy(state: dict) -> LoadReport:
    return match(state, TOY, path="toy.pth", source="toy file")


def test_match_reports_loaded_missing_mismatched_and_unused():
    report = _toy({"backbone.body.a": torch.ones(2), "backbone.body.b": torch.ones(4), "rpn.x": torch.ones(1)})
    assert report.modules == {"backbone.body": (1, 2), "backbone.fpn": (0, 1)}
    assert report.mismatched == ["backbone.body.b"] and report.unused == ["rpn.x"]
    assert report.missing == ["backbone.body.b", "backbone.fpn.c"]  # the counter is never required
    assert list(report.state) == ["backbone.body.a"]
    assert report.format() == (
        "weights: toy file\n"
        "  backbone.body       1/2    loaded  (partly loaded)\n"
        "  backbone.fpn        0/1    loaded  (random init)\n"
        "  shape mismatch, not loaded: 1 (backbone.body.b)\n"
        "  unused keys in the file: 1 (rpn.x)"
    )


def test_strict_refuses_naming_the_key_report_needs_the_body_partial_any_of_it():
    wrong_shape = _toy({"backbone.body.a": torch.ones(2), "backbone.body.b": torch.ones(4)})
    with pytest.raises(WeightsError, match=r"^toy.pth: .*backbone\.body\.b has another shape"):
        check(wrong_shape, "strict")
    assert "backbone.body.b has another shape" in refusal(wrong_shape, "report")
    assert refusal(wrong_shape, "partial") is None

    no_fpn = _toy({"backbone.body.a": torch.ones(2), "backbone.body.b": torch.ones(3)})
    assert "backbone.fpn.c is not in the file" in refusal(no_fpn, "strict")
    assert refusal(no_fpn, "report") is None and refusal(no_fpn, "partial") is None

    only_fpn = _toy({"backbone.fpn.c": torch.ones(1)})
    for policy in ("strict", "report", "partial"):
        assert "no tensor matches the toy's backbone.body" in refusal(only_fpn, policy)
    with pytest.raises(ValueError, match="unknown load policy"):
        refusal(only_fpn, "lenient")


def test_whole_modules_load_whole_or_not_at_all():
    target = Target("the toy", {**TOY.shapes, "backbone.fpn.d": torch.Size([1])}, lambda key: key)
    state = {"backbone.body.a": torch.ones(2), "backbone.body.b": torch.ones(3), "backbone.fpn.c": torch.ones(1)}
    report = match(state, target, whole=("backbone.fpn",))
    assert report.modules["backbone.fpn"] == (0, 2) and "backbone.fpn.c" not in report.state
    assert report.notes == ["backbone.fpn: only 1 of 2 tensors match (another layout): random init"]


def test_the_weights_layer_imports_no_command_package():
    """weights/ sits below the commands: none of its modules imports train, transfer, evaluate or cli."""
    root = Path(__file__).resolve().parents[1] / "src" / "soco_pretrain" / "weights"
    above = {"train", "transfer", "evaluate", "cli"}
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 2:  # from ..X (a soco_pretrain package)
                imported = [(node.module or "").split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("soco_pretrain."):
                imported = [(node.module or "").split(".")[1]]
            elif isinstance(node, ast.Import):
                imported = [a.name.split(".")[1] for a in node.names if a.name.startswith("soco_pretrain.")]
            else:
                continue
            assert not above & set(imported), (path.name, imported)
