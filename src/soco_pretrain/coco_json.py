"""The one reader of COCO-format JSON files (``images``, ``annotations``, ``categories``).

Three stages read such files: the pretraining image source (``data.dataset``: its ``images``
only), the ``views.proposal_source=coco`` ablation (``data.proposal_sources``: annotation boxes as
proposals) and the labelled sets of ``soco finetune`` / ``soco knn`` (``transfer.coco``). Each
asks :func:`read_coco_json` for the parts it uses; the file is parsed and checked here, once,
and every problem is a one-line :class:`~soco_pretrain.errors.PathError` that names the file.

Checks (COCO's format, https://cocodataset.org/#format-data):

- the file exists, is UTF-8 JSON, and is an object with the required lists;
- ``images[k]``: an object with a non-empty ``file_name``; with annotations, an ``id`` (unique);
  ``width`` / ``height``: positive integers, or numbers >= 0 where given, or not checked
  (``sizes``);
- ``categories[k]`` (when read): an object with an integer ``id``; ids unique; at least one;
- ``annotations[k]`` (when read): an object with a known ``image_id``, a 4-number ``bbox``
  ``[x, y, w, h]`` and, when categories are read, a known ``category_id``.

Nothing is converted: the lists hold the JSON's own dicts, in file order.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PathError

# How a reader treats the ``annotations`` list and the images' ``width`` / ``height``.
REQUIRED, OPTIONAL, IGNORED = "required", "optional", "ignored"
MODES = (REQUIRED, OPTIONAL, IGNORED)


@dataclass
class CocoJson:
    """A checked COCO JSON: the parts that were asked for, as the file has them (file order).

    ``annotations`` / ``categories`` are empty lists when they were not read (``IGNORED``,
    ``categories=False``) or are absent and optional. ``data`` is the parsed JSON itself.
    """

    path: Path
    images: list[dict]
    annotations: list[dict]
    categories: list[dict]
    data: dict = field(repr=False)

    def annotations_by_image(self) -> dict:
        """image id -> its annotations, in file order (images without any are absent)."""
        by_image: dict = {}
        for a in self.annotations:
            by_image.setdefault(a["image_id"], []).append(a)
        return by_image


def normalised_file_name(name: str) -> str:
    """An image's ``file_name`` as a relative POSIX path: stripped, ``./`` and ``a/../`` removed,
    so "./a.jpg" and "a.jpg" are the same image (as in list files)."""
    return Path(os.path.normpath(name.strip())).as_posix()


def _is_number(v) -> bool:
    return isinstance(v, (int, float))


def _is_key(v) -> bool:
    """An id usable as a dict key (JSON numbers and strings; not lists, objects or null)."""
    return isinstance(v, (int, float, str))


def _and(names) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def read_coco_json(
    path, *, annotations: str = OPTIONAL, categories: bool = True, sizes: str = REQUIRED, what: str = "COCO JSON"
) -> CocoJson:
    """Parse and check the COCO JSON at ``path``; :class:`PathError` (one line) if unusable.

    ``annotations``: ``"required"`` (the list must be there), ``"optional"`` (absent = none) or
    ``"ignored"`` (not read nor checked; image ids are then not needed). ``categories``: read and
    check the ``categories`` list (then required, and every annotation's ``category_id`` must be
    one of them). ``sizes``: ``"required"`` (every image needs a positive integer ``width`` and
    ``height``), ``"optional"`` (numbers >= 0 where given) or ``"ignored"``. ``what`` names the
    file in messages ("cannot read {what}").
    """
    for option, mode in (("annotations", annotations), ("sizes", sizes)):
        if mode not in MODES:
            raise ValueError(f"{option}={mode!r}: expected one of {', '.join(MODES)}")
    path = Path(path)
    if not path.is_file():
        raise PathError(path, f"no such file ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PathError(path, f"cannot read {what}: {exc.__class__.__name__}: {exc}") from exc

    required = (
        ["images"] + (["annotations"] if annotations == REQUIRED else []) + (["categories"] if categories else [])
    )
    if not isinstance(data, dict):
        raise PathError(
            path,
            f"not a COCO instances JSON (needs {_and(required)} list"
            f"{'s' if len(required) > 1 else ''}; the file holds a {type(data).__name__})",
        )
    problems = [
        f"no {name!r} list" if name not in data else f"{name!r} is not a list"
        for name in required
        if not isinstance(data.get(name), list)
    ]
    if problems:
        raise PathError(
            path,
            f"not a COCO instances JSON (needs {_and(required)} list"
            f"{'s' if len(required) > 1 else ''}): {'; '.join(problems)}",
        )
    ann_list = [] if annotations == IGNORED else data.get("annotations", [])
    if not isinstance(ann_list, list):
        raise PathError(path, "'annotations' is not a list")

    need_ids = annotations != IGNORED
    images, image_ids = [], set()
    for k, im in enumerate(data["images"]):
        name = im.get("file_name") if isinstance(im, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise PathError(path, f"images[{k}] has no 'file_name'")
        if need_ids:
            if not _is_key(im.get("id")):
                raise PathError(path, f"images[{k}] ({name}) needs an 'id' (a number or string)")
            if im["id"] in image_ids:
                raise PathError(path, f"image id {im['id']} appears twice")
            image_ids.add(im["id"])
        if sizes == REQUIRED:
            if not all(isinstance(im.get(key), int) and im[key] > 0 for key in ("width", "height")):
                raise PathError(path, f"images[{k}] ({name}) needs positive integer width and height")
        elif sizes == OPTIONAL:
            for key in ("width", "height"):
                v = im.get(key)
                if v is not None and not (_is_number(v) and math.isfinite(v) and v >= 0):
                    raise PathError(path, f"images[{k}] ({name}) has {key} {v!r} (needs a number >= 0)")
        images.append(im)

    cats, cat_ids = [], set()
    if categories:
        for k, c in enumerate(data["categories"]):
            if not isinstance(c, dict) or not isinstance(c.get("id"), int):
                raise PathError(path, f"categories[{k}] needs an integer 'id'")
            if c["id"] in cat_ids:
                raise PathError(path, "duplicate category ids")
            cat_ids.add(c["id"])
            cats.append(c)
        if not cats:
            raise PathError(path, "no categories")

    anns = []
    for k, a in enumerate(ann_list):
        if not isinstance(a, dict):
            raise PathError(path, f"annotations[{k}] is not an object")
        if "image_id" not in a:
            raise PathError(path, f"annotations[{k}] needs a known 'image_id' (it has none)")
        if not _is_key(a["image_id"]) or a["image_id"] not in image_ids:
            raise PathError(
                path, f"annotations[{k}] needs a known 'image_id' (refers to unknown image id {a['image_id']})"
            )
        if categories:
            if "category_id" not in a:
                raise PathError(path, f"annotations[{k}] needs 'image_id' and 'category_id'")
            if not _is_key(a["category_id"]) or a["category_id"] not in cat_ids:
                raise PathError(path, f"annotations[{k}] has unknown category id {a['category_id']}")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise PathError(path, f"annotations[{k}] needs a 4-number 'bbox' as [x, y, w, h]")
        anns.append(a)
    return CocoJson(path=path, images=images, annotations=anns, categories=cats, data=data)
