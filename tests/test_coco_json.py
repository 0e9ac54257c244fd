"""coco_json.py: the one COCO JSON reader, and its three callers (the dataset's image source,
the coco proposal source, transfer's load_coco) getting the same objects and the same errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from soco_pretrain.coco_json import (
    IGNORED,
    OPTIONAL,
    REQUIRED,
    normalised_file_name,
    read_coco_json,
)
from soco_pretrain.data.dataset import read_coco_images
from soco_pretrain.data.proposal_sources import read_coco_boxes
from soco_pretrain.errors import PathError, UserError
from soco_pretrain.transfer.coco import load_coco


def valid_coco() -> dict:
    """Two images (ids out of order, one "./"-prefixed name), categories out of order, a crowd
    box, an empty box and an image without annotations."""
    return {
        "images": [
            {"id": 9, "file_name": "b/two.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "./a/one.png", "width": 64, "height": 48},
            {"id": 5, "file_name": "a/none.png", "width": 10, "height": 10},
        ],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 7, "bbox": [1, 2, 10, 20]},
            {"id": 2, "image_id": 9, "category_id": 3, "bbox": [0.5, 0.5, 4, 4], "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5.5, 6, 7.25, 8]},
            {"id": 4, "image_id": 9, "category_id": 7, "bbox": [3, 3, 0, 9]},
            {"id": 5, "image_id": 9, "category_id": 3, "bbox": [2, 4, 6, 8]},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


@pytest.fixture
def coco_file(tmp_path):
    def write(content, name="instances.json"):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    return write


def _callers(path, tmp_path):
    """Each caller's reading of ``path``, as a zero-argument function, with its error class (the
    reader's own PathError, passed on unchanged)."""
    (tmp_path / "imgs").mkdir(exist_ok=True)
    return {
        "images": (lambda: read_coco_images(path, tmp_path / "imgs"), PathError),
        "boxes": (lambda: read_coco_boxes(path, ["a/one.png", "b/two.png"]), PathError),
        "load_coco": (lambda: load_coco(path, tmp_path / "imgs"), PathError),
    }


# ---------------------------------------------------------------- a valid file


def test_valid_file_is_read_as_is_in_file_order(coco_file):
    data = valid_coco()
    path = coco_file(data)
    parsed = read_coco_json(path)
    assert parsed.path == path and parsed.data == data
    assert parsed.images == data["images"]
    assert parsed.annotations == data["annotations"] and parsed.categories == data["categories"]
    assert [a["id"] for a in parsed.annotations_by_image()[9]] == [2, 4, 5]
    assert [a["id"] for a in parsed.annotations_by_image()[2]] == [1, 3]
    assert 5 not in parsed.annotations_by_image()
    only_images = read_coco_json(path, annotations=IGNORED, categories=False, sizes=IGNORED)
    assert only_images.images == data["images"] and only_images.annotations == [] and only_images.categories == []


def test_dataset_image_source_gets_the_normalised_sorted_names(coco_file, tmp_path):
    path = coco_file(valid_coco())
    listed = read_coco_images(path, tmp_path)
    assert listed.paths == ["a/none.png", "a/one.png", "b/two.png"] and listed.root == tmp_path.resolve()
    assert read_coco_images(path).root == path.parent.resolve()


def test_proposal_source_gets_xyxy_boxes_sizes_and_missing(coco_file):
    path = coco_file(valid_coco())
    boxes = read_coco_boxes(path, ["a/one.png", "b/two.png", "a/none.png", "c/absent.png"])
    np.testing.assert_allclose(boxes.of(0), [[1, 2, 11, 22], [5.5, 6, 12.75, 14]])
    np.testing.assert_allclose(boxes.of(1), [[2, 4, 8, 12]])  # crowd and empty box skipped
    assert boxes.of(2).shape == (0, 4) and boxes.of(3).shape == (0, 4)
    assert boxes.sizes.tolist() == [[64, 48], [40, 30], [10, 10], [0, 0]]
    assert boxes.missing.tolist() == [False, False, True, True]
    assert boxes.reasons == {"not in the JSON": 1, "no boxes": 1}


def test_load_coco_gets_images_and_categories_by_id_and_annotations_per_image(coco_file, tmp_path):
    data = valid_coco()
    path = coco_file(data)
    (tmp_path / "imgs").mkdir()
    coco = load_coco(path, tmp_path / "imgs")
    assert [im["id"] for im in coco.images] == [2, 5, 9]
    assert coco.cat_ids == [3, 7] and coco.cat_to_label == {3: 1, 7: 2} and coco.num_classes == 3
    assert {k: [a["id"] for a in v] for k, v in coco.anns.items()} == {2: [1, 3], 9: [2, 4, 5]}
    assert coco.data == data and coco.image_path(coco.images[0]) == tmp_path / "imgs" / "./a/one.png"


def test_annotations_are_optional_for_load_coco_and_required_for_boxes(coco_file, tmp_path):
    data = valid_coco()
    del data["annotations"]
    path = coco_file(data)
    callers = _callers(path, tmp_path)
    assert callers["load_coco"][0]().anns == {}
    assert len(callers["images"][0]()) == 3
    with pytest.raises(PathError, match="needs 'images' and 'annotations' lists"):
        callers["boxes"][0]()


def test_image_source_ignores_annotations_and_categories(coco_file, tmp_path):
    path = coco_file({"images": [{"file_name": "x.png"}], "annotations": [{"image_id": 1}], "categories": 3})
    assert read_coco_images(path, tmp_path).paths == ["x.png"]
    with pytest.raises(PathError, match="'categories' is not a list"):
        read_coco_json(path)


# ---------------------------------------------------------------- bad files: one line, the file named, per caller


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "not a COCO instances JSON"),
        (json.dumps({"annotations": [], "categories": [{"id": 1}]}), "no 'images' list"),
        (
            json.dumps({"images": [{"id": 1, "width": 5, "height": 5}], "annotations": [], "categories": [{"id": 1}]}),
            "images[0] has no 'file_name'",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "  ", "width": 5, "height": 5}],
                    "annotations": [],
                    "categories": [{"id": 1}],
                }
            ),
            "images[0] has no 'file_name'",
        ),
    ],
)
def test_bad_files_fail_the_same_way_in_every_caller(coco_file, tmp_path, content, problem):
    path = coco_file(content)
    with pytest.raises(PathError) as direct:
        read_coco_json(path)
    assert problem in str(direct.value)
    for name, (call, error) in _callers(path, tmp_path).items():
        with pytest.raises(error) as err:
            call()
        message = str(err.value)
        assert isinstance(err.value, UserError), name
        assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, (name, message)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(PathError, match=r"absent.json: no such file \(COCO JSON\)") as err:
        read_coco_json(tmp_path / "absent.json")
    assert err.value.path == str(tmp_path / "absent.json")
    with pytest.raises(PathError, match=r"absent.json: no such file \(the proposal JSON\)"):
        read_coco_boxes(tmp_path / "absent.json", [])
    with pytest.raises(PathError, match="absent.json: no such COCO JSON file"):
        load_coco(tmp_path / "absent.json", tmp_path)


def test_malformed_json_messages_keep_each_callers_wording(coco_file, tmp_path):
    path = coco_file("{not json")
    callers = _callers(path, tmp_path)
    for name, wording in (
        ("images", "cannot read COCO JSON"),
        ("load_coco", "cannot read COCO JSON"),
        ("boxes", "cannot read the proposal JSON"),
    ):
        call, error = callers[name]
        with pytest.raises(error, match=wording):
            call()


def test_an_annotation_of_an_unknown_image_is_an_error_where_annotations_are_read(coco_file, tmp_path):
    data = valid_coco()
    data["annotations"][2]["image_id"] = 404
    path = coco_file(data)
    callers = _callers(path, tmp_path)
    for name in ("boxes", "load_coco"):
        call, error = callers[name]
        with pytest.raises(error) as err:
            call()
        message = str(err.value)
        assert str(path) in message and "annotations[2]" in message and "unknown image id 404" in message
        assert "known 'image_id'" in message
    assert len(callers["images"][0]()) == 3  # the image source does not read annotations


@pytest.mark.parametrize(
    "change, problem, kwargs",
    [
        (lambda d: d["annotations"][0].pop("bbox"), "annotations[0] needs a 4-number 'bbox'", {}),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, "3", 4]), "annotations[1] needs a 4-number 'bbox'", {}),
        (lambda d: d["annotations"][3].pop("image_id"), "annotations[3] needs a known 'image_id'", {}),
        (lambda d: d["annotations"][4].update(image_id=[9]), "annotations[4] needs a known 'image_id'", {}),
        (lambda d: d["annotations"][0].pop("category_id"), "annotations[0] needs 'image_id' and 'category_id'", {}),
        (lambda d: d["annotations"][0].update(category_id=99), "annotations[0] has unknown category id 99", {}),
        (lambda d: d["annotations"].append(7), "annotations[5] is not an object", {}),
        (lambda d: d["images"][1].pop("id"), "images[1] (./a/one.png) needs an 'id'", {}),
        (lambda d: d["images"][2].update(id=9), "image id 9 appears twice", {}),
        (lambda d: d["images"][0].pop("height"), "images[0] (b/two.png) needs positive integer width and height", {}),
        (lambda d: d["images"][0].update(width=0), "needs positive integer width and height", {}),
        (
            lambda d: d["images"][0].update(width="40"),
            "images[0] (b/two.png) has width '40'",
            {"categories": False, "sizes": OPTIONAL},
        ),
        (lambda d: d["categories"].clear(), "no categories", {}),
        (lambda d: d["categories"].append({"id": 7}), "duplicate category ids", {}),
        (lambda d: d["categories"].append({"name": "x"}), "categories[2] needs an integer 'id'", {}),
        (lambda d: d.pop("categories"), "needs 'images' and 'categories' lists): no 'categories' list", {}),
        (
            lambda d: d.pop("annotations"),
            "needs 'images', 'annotations' and 'categories' lists",
            {"annotations": REQUIRED},
        ),
    ],
)
def test_missing_or_bad_keys(coco_file, change, problem, kwargs):
    data = valid_coco()
    change(data)
    path = coco_file(data)
    with pytest.raises(PathError) as err:
        read_coco_json(path, **kwargs)
    assert problem in str(err.value) and str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_checks_left_out_are_not_made(coco_file):
    data = valid_coco()
    data["annotations"][0]["category_id"] = 99  # categories not read: not checked
    data["images"][0].pop("width")  # sizes optional: absent is fine
    data["images"][1]["height"] = 47.5  # ... and a number is enough
    path = coco_file(data)
    parsed = read_coco_json(path, annotations=REQUIRED, categories=False, sizes=OPTIONAL)
    assert parsed.categories == [] and len(parsed.annotations) == 5
    data["images"][1]["height"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(PathError, match="height -1"):
        read_coco_json(path, categories=False, sizes=OPTIONAL)
    assert len(read_coco_json(path, categories=False, sizes=IGNORED).images) == 3


def test_unknown_modes_are_refused(coco_file):
    path = coco_file(valid_coco())
    with pytest.raises(ValueError, match="annotations='maybe'"):
        read_coco_json(path, annotations="maybe")
    with pytest.raises(ValueError, match="sizes=True"):
        read_coco_json(path, sizes=True)


def test_error_is_a_user_error_and_pickles(tmp_path):
    exc = PathError(tmp_path / "x.json", "bad\n  thing")
    assert isinstance(exc, UserError) and exc.exit_code == 2
    assert str(exc) == f"{tmp_path / 'x.json'}: bad thing"
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is PathError and str(again) == str(exc) and again.reason == "bad thing"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.jpg", "a.jpg"),
        ("./a.jpg", "a.jpg"),
        (" b/./c.png ", "b/c.png"),
        ("b/x/../c.png", "b/c.png"),
    ],
)
def test_normalised_file_name(name, expected):
    assert normalised_file_name(name) == expected
