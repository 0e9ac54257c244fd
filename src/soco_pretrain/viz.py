"""Pictures for checking results by eye.

``draw_proposals`` draws a random subset of an image's proposals in distinct colours (like
the paper's Figure 2); ``show_proposals`` does that for a sample of a store's images, makes
a contact sheet, and plots the store-wide statistics of the paper's Figure 3 (proposals per
image, proposal size).
"""

from __future__ import annotations

import colorsys
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write_json
from .images import ImageError, load_rgb_bounded
from .proposals.filters import RULE_FAILED, RULE_NAMES
from .proposals.store import load

# Long side of the drawn pictures: big photos are shown on a resized copy.
DISPLAY_MAX_SIDE = 800
# Contact sheet cell size (pixels).
CELL = 320
# Rows of the boxes array read at once for the statistics (bounded memory on big stores).
CHUNK_ROWS = 4_000_000


def distinct_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` saturated colours with hues spread evenly (golden-ratio steps keep neighbours apart)."""
    colours = []
    for k in range(n):
        hue = (k * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.95, 1.0)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def draw_proposals(
    image: np.ndarray, boxes: np.ndarray, max_boxes: int = 10, seed: int = 0, line_width: int | None = None
) -> Image.Image:
    """Draw up to ``max_boxes`` randomly chosen boxes on ``image``, each in its own colour.

    ``image`` is (H, W, 3) uint8 (or (H, W) gray); ``boxes`` is (n, 4) x1, y1, x2, y2 with x2/y2
    the last pixel column/row (inclusive), in the image's pixels. Returns a new RGB PIL image.
    """
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    boxes = np.asarray(boxes).reshape(-1, 4)
    if len(boxes) > max_boxes:
        rng = np.random.default_rng(seed)
        boxes = boxes[np.sort(rng.choice(len(boxes), size=max_boxes, replace=False))]
    if line_width is None:
        line_width = max(2, round(min(picture.size) / 150))
    draw = ImageDraw.Draw(picture)
    for box, colour in zip(boxes.tolist(), distinct_colours(len(boxes))):
        x1, y1, x2, y2 = box
        # PIL includes x2/y2 and draws the width inwards, so the outline sits on the box edge.
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colour, width=line_width)
    return picture


def _open_store(store):
    """A ProposalStore, opened (with its format checks) when given as a directory."""
    if isinstance(store, (str, Path)):
        return load(store)
    return store


def _images_root(images_source) -> Path:
    # Store paths are relative to the folder, or to a list file's directory (see images.list_images).
    source = Path(images_source)
    return source if source.is_dir() else source.parent


def _safe_name(path: str) -> str:
    stem = Path(path).with_suffix("").as_posix()
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_")[:80] or "image"


def proposal_stats(store) -> dict:
    """Store-wide numbers: proposals per image and proposal size sqrt(w*h) in original pixels.

    ``store``: a ProposalStore or its directory (opened with the store's checks). Vectorised
    over the store's per-image arrays, the boxes read in chunks so a store of ImageNet size
    needs little memory. Failed images are left out of the per-image counts.
    Sizes are binned at 1 px (``size_hist[k]`` = boxes with k <= size < k+1).
    """
    store = _open_store(store)
    status = store.statuses()
    counts = store.counts()
    ok = status != RULE_FAILED
    per_image = counts[ok]

    size_hist = np.zeros(1, dtype=np.int64)
    size_sum = 0.0
    for chunk in store.box_chunks(CHUNK_ROWS):
        chunk = chunk.astype(np.float64)
        size = np.sqrt((chunk[:, 2] - chunk[:, 0]) * (chunk[:, 3] - chunk[:, 1]))
        size_sum += float(size.sum())
        binned = np.bincount(size.astype(np.int64))
        if len(binned) > len(size_hist):
            size_hist = np.pad(size_hist, (0, len(binned) - len(size_hist)))
        size_hist[: len(binned)] += binned

    rules = {}
    values, freq = np.unique(status, return_counts=True)
    for value, n in zip(values.tolist(), freq.tolist()):
        rules[RULE_NAMES.get(value, str(value))] = n
    n_boxes = int(counts.sum())
    return {
        "images": int(len(counts)),
        "failed": int((~ok).sum()),
        "images_without_boxes": int((per_image == 0).sum()),
        "rules": rules,
        "boxes": n_boxes,
        "proposals_per_image": _summary(per_image.astype(np.float64)),
        "proposal_size_px": {
            "mean": size_sum / n_boxes if n_boxes else None,
            **_hist_quantiles(size_hist),
        },
        "_per_image": per_image,
        "_size_hist": size_hist,
    }


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"mean": None, "min": None, "p10": None, "median": None, "p90": None, "max": None}
    p10, median, p90 = np.percentile(values, [10, 50, 90]).tolist()
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        "p10": p10,
        "median": median,
        "p90": p90,
        "max": float(values.max()),
    }


def _hist_quantiles(hist: np.ndarray) -> dict:
    """Quantiles (to 1 px) from a histogram of 1-px bins."""
    total = int(hist.sum())
    if total == 0:
        return {"min": None, "p10": None, "median": None, "p90": None, "max": None}
    cum = np.cumsum(hist)
    nonzero = np.flatnonzero(hist)

    def q(fraction):
        return int(np.searchsorted(cum, fraction * total, side="left"))

    return {"min": int(nonzero[0]), "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": int(nonzero[-1])}


def _plot_stats(stats: dict, path: Path) -> None:
    # here, not at the top: pyplot must come after use("Agg"), which importing this module must not do
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    per_image = stats["_per_image"]
    size_hist = stats["_size_hist"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if len(per_image):
        left.hist(per_image, bins=min(50, max(1, int(per_image.max()) + 1)), color="tab:blue")
    left.set_xlabel("number of proposals per image")
    left.set_ylabel("images")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images: no 0.25 ticks
    left.set_title(f"{stats['images'] - stats['failed']} images, {stats['boxes']} proposals")

    if size_hist.sum():
        # Re-bin the 1-px histogram into at most 50 bars.
        width = max(1, math.ceil(len(size_hist) / 50))
        padded = np.pad(size_hist, (0, (-len(size_hist)) % width))
        bars = padded.reshape(-1, width).sum(axis=1)
        edges = np.arange(len(bars)) * width
        right.bar(edges, bars, width=width, align="edge", color="tab:orange")
    right.set_xlabel("proposal size sqrt(w*h) (pixels)")
    right.set_ylabel("proposals")
    right.set_title("proposal size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _titled(picture: Image.Image, text: str) -> Image.Image:
    """``picture`` under a white strip holding ``text`` (the file and how many boxes are drawn)."""
    font = _font(max(12, min(24, picture.width // 40)))
    probe = ImageDraw.Draw(picture).textbbox((0, 0), text, font=font)
    strip = probe[3] - probe[1] + 10
    out = Image.new("RGB", (picture.width, picture.height + strip), "white")
    out.paste(picture, (0, strip))
    ImageDraw.Draw(out).text((5, 4), text, fill="black", font=font)
    return out


def _contact_sheet(pictures: list[tuple[str, Image.Image]], path: Path) -> None:
    cols = max(1, math.ceil(math.sqrt(len(pictures))))
    rows = max(1, math.ceil(len(pictures) / cols))
    caption = 16
    sheet = Image.new("RGB", (cols * CELL, rows * (CELL + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, picture) in enumerate(pictures):
        # Fill the cell: shrink big pictures smoothly, blow small ones up without blurring the lines.
        scale = min((CELL - 4) / picture.width, (CELL - 4) / picture.height)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        thumb = picture.resize(size, Image.BILINEAR if scale < 1 else Image.NEAREST)
        x, y = (k % cols) * CELL, (k // cols) * (CELL + caption)
        sheet.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        draw.text((x + 4, y + CELL), name[-48:], fill="black")
    sheet.save(path)


def show_proposals(store, images_source, out_dir, num: int = 8, per_image: int = 10, seed: int = 0) -> list[Path]:
    """Draw proposals for ``num`` random images of ``store``, a contact sheet and statistics.

    ``store`` is a ProposalStore (or its directory); ``images_source`` the folder or list file
    the store was made from. Writes into ``out_dir``: one ``proposals_KK_NAME.png`` per drawn
    image, ``contact_sheet.png``, ``stats.png`` (histograms of proposals per image and of
    proposal size over the whole store) and ``stats.json``. Images whose file is missing,
    unreadable or changed size since the store was made are reported and skipped.
    Returns the written paths.
    """
    store = _open_store(store)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = _images_root(images_source)
    rng = np.random.default_rng(seed)

    candidates = np.flatnonzero(store.statuses() != RULE_FAILED).tolist()
    chosen = sorted(rng.choice(len(candidates), size=min(num, len(candidates)), replace=False).tolist())
    written: list[Path] = []
    drawn: list[tuple[str, Image.Image]] = []
    for k, c in enumerate(chosen):
        i = candidates[c]
        rel = store.paths[i]
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        try:
            image, size, factor = load_rgb_bounded(path, DISPLAY_MAX_SIDE)
        except ImageError as exc:
            print(f"skipped {exc}")
            continue
        if tuple(size) != tuple(store.image_size(i)):
            print(
                f"skipped {path}: image is {size[0]}x{size[1]} but the store has "
                f"{store.image_size(i)[0]}x{store.image_size(i)[1]} (changed since the proposals were made?)"
            )
            continue
        boxes = np.round(np.asarray(store.boxes(i), dtype=np.float64) / factor).astype(np.int64)
        caption = f"{rel}: {min(len(boxes), per_image)} of {len(boxes)} boxes shown"
        picture = _titled(draw_proposals(image, boxes, per_image, seed=seed + i), caption)
        target = out_dir / f"proposals_{k:02d}_{_safe_name(rel)}.png"
        picture.save(target)
        written.append(target)
        drawn.append((caption, picture))

    if drawn:
        sheet = out_dir / "contact_sheet.png"
        _contact_sheet(drawn, sheet)
        written.append(sheet)

    stats = proposal_stats(store)
    plot = out_dir / "stats.png"
    _plot_stats(stats, plot)
    written.append(plot)
    numbers = out_dir / "stats.json"
    public = {k: v for k, v in stats.items() if not k.startswith("_")}
    atomic_write_json(numbers, public)
    written.append(numbers)
    return written


# ---------------------------------------------------------------- views (paper Figure 1)

# Views are drawn enlarged by this factor (nearest neighbour: the pixels stay honest and the
# 112-px view keeps its true size relative to the others).
VIEW_SCALE = 2
GAP = 12  # pixels between panels
TITLE = 18  # title strip above each panel
LEVEL_NAMES = ("P2", "P3", "P4", "P5")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _label(draw, xy, text, colour, font, placed: list | None = None) -> None:
    """Text on a filled tag of the box's colour (black or white text, whichever reads).

    ``placed``: tags already drawn on this picture; the tag moves down until it hides none
    (boxes of one image often share a corner).
    """
    x, y = xy
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    if placed is not None:
        for _ in range(len(placed) + 1):
            if not any(left < x2 and x1 < right and top < y2 and y1 < bottom for x1, y1, x2, y2 in placed):
                break
            step = bottom - top + 3
            y, top, bottom = y + step, top + step, bottom + step
        placed.append((left, top, right, bottom))
    draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=colour)
    dark = sum(c * w for c, w in zip(colour, (0.299, 0.587, 0.114))) < 140
    draw.text((x, y), text, fill="white" if dark else "black", font=font)


def proposal_colours(proposal_ids) -> dict[int, tuple[int, int, int]]:
    """One colour per distinct proposal id (order of first appearance), padding (-1) excluded."""
    ids = [int(i) for i in np.asarray(proposal_ids).tolist() if int(i) >= 0]
    unique = list(dict.fromkeys(ids))
    return dict(zip(unique, distinct_colours(len(unique))))


def _draw_view(image, boxes, levels, valid, proposal_ids, scale, font) -> Image.Image:
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    colours = proposal_colours(proposal_ids)
    placed: list = []
    for k, (box, ok, pid) in enumerate(
        zip(np.asarray(boxes).tolist(), np.asarray(valid).tolist(), np.asarray(proposal_ids).tolist())
    ):
        if not ok:  # padded slots hold no proposal
            continue
        colour = colours[int(pid)]
        # Continuous box [x1, x2): its last pixel column is x2 - 1 (PIL's rectangle is inclusive).
        x1, y1, x2, y2 = (c * scale for c in box)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=2)
        _label(draw, (x1 + 3, y1 + 2), LEVEL_NAMES[int(levels[k])], colour, font, placed)
    return picture


def draw_views(
    images,
    boxes,
    levels,
    valid,
    proposal_ids,
    names=None,
    original=None,
    original_boxes=None,
    crops=None,
    scale: int = VIEW_SCALE,
) -> Image.Image:
    """Each view side by side with its boxes, like the data part of the paper's Figure 1.

    ``images``: list of uint8 HxWx3 views; ``boxes[v]``: (K, 4) continuous boxes in view v's
    pixels; ``levels[v]``: (K,) FPN levels 0..3, drawn as P2..P5; ``valid``: (K,) bool, padded
    slots are not drawn; ``proposal_ids``: (K,) ids, one colour per proposal in every view.
    ``original`` (optional): the source image, drawn first with ``original_boxes`` (the K
    proposals in its pixels, continuous) and ``crops`` (list of (name, rect) in its pixels, white).
    """
    font = _font(12 if scale == 1 else 14)
    names = names or [f"V{v + 1}" for v in range(len(images))]
    panels = []
    if original is not None:
        height = np.asarray(images[0]).shape[0] * scale
        pic = Image.fromarray(np.asarray(original)).convert("RGB")
        factor = height / pic.height
        pic = pic.resize((max(1, round(pic.width * factor)), height), Image.BILINEAR)
        draw = ImageDraw.Draw(pic)
        colours = proposal_colours(proposal_ids)
        if original_boxes is not None:
            for box, ok, pid in zip(
                np.asarray(original_boxes).tolist(), np.asarray(valid).tolist(), np.asarray(proposal_ids).tolist()
            ):
                if ok:
                    x1, y1, x2, y2 = (c * factor for c in box)
                    draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colours[int(pid)], width=2)
        for name, rect in crops or []:
            x1, y1, x2, y2 = (c * factor for c in rect)
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline="white", width=1)
            _label(draw, (x1 + 3, max(0, y2 - 18)), name, (255, 255, 255), font)
        panels.append((f"image {np.asarray(original).shape[1]}x{np.asarray(original).shape[0]}", pic))
    for v, image in enumerate(images):
        pic = _draw_view(image, boxes[v], levels[v], valid, proposal_ids, scale, font)
        size = np.asarray(image).shape
        panels.append((f"{names[v]} {size[1]}x{size[0]}", pic))
    width = sum(p.width for _, p in panels) + GAP * (len(panels) + 1)
    height = max(p.height for _, p in panels) + TITLE + 2 * GAP
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x = GAP
    for title, pic in panels:
        draw.text((x, GAP // 2), title, fill="black", font=font)
        sheet.paste(pic, (x, GAP + TITLE))
        x += pic.width + GAP
    return sheet


def show_views(dataset, out_dir, num: int = 4, seed: int = 0, augment: bool = False, epoch: int = 0) -> list[Path]:
    """Draw the views of ``num`` random images of ``dataset`` (a data.SoCoDataset) into
    ``out_dir`` as ``views_KK_NAME.png``; returns the written paths.

    ``augment``: also apply the CPU photometric augmentation (shown un-normalised). Images that
    fail to decode are replaced by the next one (as in training) and reported on stdout.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataset.config
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(dataset), size=min(num, len(dataset)), replace=False).tolist())
    names = ["V1", "V2", "V3", "V4"][: dataset.num_views]
    written = []
    for k, i in enumerate(chosen):
        raw = dataset.raw(i, epoch)
        for path, reason in raw.skipped:
            print(f"skipped {path}: {reason}")
        vs = raw.views
        images = vs.images
        if augment:
            images = [
                _augmented(img, cfg.augment, cfg.augment.view_params[v], raw.generator) for v, img in enumerate(images)
            ]
        # The K proposals and the crops in the original image's pixels (crops are in V1's).
        h, w = raw.image.shape[:2]
        sx, sy = w / cfg.views.v1_size, h / cfg.views.v1_size
        ids = np.asarray(vs.proposal_ids)
        original_boxes = np.where(ids[:, None] >= 0, raw.boxes[np.maximum(ids, 0)], 0.0)
        crops = [(names[v], (r[0] * sx, r[1] * sy, r[2] * sx, r[3] * sy)) for v, r in enumerate(vs.crops) if v > 0]
        # V3 downsampled from V2 has V2's rectangle: draw it once.
        seen, unique = set(), []
        for name, rect in crops:
            key = tuple(round(c, 3) for c in rect)
            if key not in seen:
                seen.add(key)
                unique.append((name, rect))
        flips = [f"{n}{' flipped' if f else ''}" for n, f in zip(names, vs.flipped)]
        picture = draw_views(
            images,
            vs.boxes,
            vs.levels,
            vs.valid,
            ids,
            names=flips,
            original=raw.image,
            original_boxes=original_boxes,
            crops=unique,
        )
        target = out_dir / f"views_{k:02d}_{_safe_name(raw.path)}.png"
        picture.save(target)
        written.append(target)
    return written


def _augmented(image: np.ndarray, cfg, param_set: int, generator) -> np.ndarray:
    """CPU photometric augmentation of one uint8 HxWx3 view, back to uint8 for display."""
    # here, not at the top: soco show proposals must not import torch
    import torch

    from .data.augment import augment_cpu

    t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    out = augment_cpu(t, param_set, cfg, generator)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    pixels = ((out * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- training curves

# Panels of ``plot_curves``: (metrics key, title, y label).
CURVES = [
    ("loss", "loss", "loss"),
    ("lr", "learning rate", "lr"),
    ("tau", "EMA momentum tau", "tau"),
    ("images_per_s", "throughput", "images/s"),
]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    # Trailing moving average (same length; the first points average what exists so far).
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_curves(run_dir, out_dir=None, records: list[dict] | None = None) -> list[Path]:
    """Plot loss, lr, tau and images/s (with the data-wait fraction) against the optimiser step,
    plus the object kNN top-1 and the features' effective rank when the monitor logged them.

    Reads ``RUN/metrics.jsonl`` (unless ``records`` are given) and writes ``curves.png`` into
    ``out_dir`` (default: the run folder). Returns the written paths. Raises ValueError when
    there is nothing to plot.
    """
    from .engine.metrics import read_metrics  # here, not at the top: it imports torch

    if records is None:
        records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: no metrics logged yet")
    out_dir = Path(run_dir if out_dir is None else out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # here, not at the top: pyplot must come after use("Agg"), which importing this module must not do
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    def series(key):
        pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return np.array(pairs, dtype=float).reshape(-1, 2)

    monitored = any("knn_top1" in r for r in records)  # the object kNN monitor ran: two more panels
    fig, axes = plt.subplots(2, 3 if monitored else 2, figsize=(16 if monitored else 11, 7), sharex=True)
    panels = list(axes[:, :2].flat) if monitored else list(axes.flat)
    for ax, (key, title, label) in zip(panels, CURVES):
        data = series(key)
        ax.set_title(title)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if not len(data):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        ax.plot(
            data[:, 0],
            data[:, 1],
            color="tab:blue",
            lw=1,
            alpha=0.5 if key == "loss" else 1.0,
            marker="." if len(data) < 30 else None,
        )
        if key == "loss" and len(data) >= 20:
            window = max(5, len(data) // 20)
            ax.plot(
                data[:, 0], _smooth(data[:, 1], window), color="tab:red", lw=1.5, label=f"mean of {window} logged steps"
            )
            ax.legend(loc="upper right", fontsize=8)
        if key == "images_per_s":
            wait = series("data_wait")
            if len(wait):
                twin = ax.twinx()
                twin.plot(wait[:, 0], 100 * wait[:, 1], color="tab:orange", lw=1, ls="--")
                twin.set_ylabel("waiting for data (%)", color="tab:orange")
                twin.set_ylim(0, 100)
    if monitored:
        for ax, keys, title, label in (
            (
                axes[0, 2],
                (
                    ("knn_top1", "kNN top-1, online"),
                    ("knn_target_top1", "kNN top-1, target (EMA)"),
                    ("probe_balanced", "logistic balanced acc., online"),
                    ("probe_target_balanced", "logistic balanced acc., target"),
                ),
                "object probe",
                "% of val objects",
            ),
            (
                axes[1, 2],
                (("erank_online", "online"), ("erank_target", "target (EMA)")),
                "box features: effective rank (1 = collapsed)",
                "effective rank",
            ),
        ):
            for (key, name), colour in zip(keys, ("tab:blue", "tab:green", "tab:purple", "tab:olive")):
                data = series(key)
                if not len(data):  # runs from before the logistic readout
                    continue
                ax.plot(data[:, 0], data[:, 1], color=colour, marker=".", lw=1, label=name)
            ax.set_title(title)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("optimiser step")
    last = records[-1]
    fig.suptitle(
        f"{Path(run_dir).name}: {len(records)} logged steps, last step {last['step']}"
        + (f", epoch {last['epoch']}" if "epoch" in last else "")
    )
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
