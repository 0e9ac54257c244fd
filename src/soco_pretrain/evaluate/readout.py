"""Readouts of frozen object features: weighted cosine kNN, a logistic regression, their metrics,
and the probe's floor (a hand-made descriptor, shuffled labels).

Our choices for the probe (the paper evaluates by fine-tuning only), each a common one:

- **Centring + L2** before the cosine kNN: subtract the train objects' mean feature, then
  normalise (SimpleShot, Wang et al. 2019: "CL2N"). Random-init box-head features are non-negative
  and anisotropic, so without centring every cosine is near 1 and the votes near arbitrary.
- **kNN**: the k nearest train objects vote for their class with weight exp(cos / T) (Wu et al.
  2018), computed as exp((cos - max cos) / T): the same ranking, no overflow for a tiny T.
- **Logistic regression** (scikit-learn, lbfgs, L2, ``class_weight="balanced"`` since the main
  figure is the balanced accuracy, seeded), on features standardised with the train objects' mean
  and sd. Its strength C is chosen from ``C_GRID`` by stratified 5-fold cross-validation on the
  *train* objects (balanced accuracy), never on the val ones: with a few hundred objects and
  512-2048 dimensions a fixed C = 1 overfits (on coco_pool's 11 frequent classes the hand-made
  descriptor scored 25% at C = 1 and 38% at the C the folds chose).
- **Balanced accuracy** = mean per-class recall over the classes present in val: the main figure
  (one class can dominate: "person" is about a quarter of COCO's objects). Also top-1, top-5,
  the majority class's share of val (a classifier answering "person" always scores it) and the
  person-vs-rest AUROC when a class named "person" is kept.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.stats import rankdata
from skimage.feature import hog
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from torch import nn

# Logistic regression strengths tried by the cross-validation (inverse L2 weight, scikit-learn's C).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 1.0)


def centre_normalise(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the train rows' mean from both, then L2-normalise every row (SimpleShot's CL2N)."""
    mean = train.double().mean(0, keepdim=True)
    train = nn.functional.normalize((train.double() - mean).float(), dim=1)
    val = nn.functional.normalize((val.double() - mean).float(), dim=1)
    return train, val


def knn_scores(
    train_feats,
    train_labels,
    val_feats,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    train_keys=None,
    val_keys=None,
    chunk: int = 1024,
) -> torch.Tensor:
    """(N_val, C) class scores of the weighted cosine kNN; neighbours with the same key are excluded.

    A query's votes are exp((cos - cos of its nearest neighbour) / T): the per-query factor
    exp(-max / T) leaves the ranking of its classes unchanged and keeps every vote in (0, 1], so a
    tiny temperature (0.005: exp(200) overflows float32) still ranks by the nearest neighbours."""
    train = nn.functional.normalize(train_feats.float(), dim=1)
    val = nn.functional.normalize(val_feats.float(), dim=1)
    k = min(k, train.shape[0])
    scores = torch.zeros(val.shape[0], num_classes)
    for start in range(0, val.shape[0], chunk):
        sim = val[start : start + chunk] @ train.T
        if train_keys is not None and val_keys is not None:
            same = val_keys[start : start + chunk, None] == train_keys[None, :]
            sim = sim.masked_fill(same, float("-inf"))
        top, idx = sim.topk(k, dim=1)
        best = top[:, :1].clamp(min=-1.0)  # -inf only when every neighbour is excluded
        weight = torch.exp((top - best) / temperature)  # exp(-inf) = 0: an excluded neighbour never votes
        scores[start : start + chunk].scatter_add_(1, train_labels[idx], weight)
    return scores


def logistic_scores(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, num_classes: int,
                    seed: int = 0) -> torch.Tensor:  # fmt: skip
    """(N_val, C) class probabilities of a logistic regression fitted on standardised train features
    (classes absent from train get 0)."""
    x = train_x.double().numpy()
    mean, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1.0  # a constant feature carries nothing; keep it finite
    y = train_y.numpy()
    classes = np.unique(y)
    out = torch.zeros(val_x.shape[0], num_classes, dtype=torch.float64)
    if len(classes) < 2:  # one class: it is every answer
        out[:, int(classes[0])] = 1.0
        return out
    folds = int(min(5, np.bincount(y)[classes].min()))
    model: LogisticRegression | LogisticRegressionCV
    if folds >= 2:
        model = LogisticRegressionCV(
            Cs=list(C_GRID),
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            scoring="balanced_accuracy",
            class_weight="balanced",
            max_iter=1000,
            random_state=seed,
        )
    else:  # a class with one train object cannot be split into folds
        model = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced", random_state=seed)
    with warnings.catch_warnings():  # an unconverged fit is still a readout; max_iter is fixed
        warnings.simplefilter("ignore", ConvergenceWarning)
        # scikit-learn >= 1.8 announces new defaults of LogisticRegressionCV (l1_ratios, its
        # fitted attributes) that change neither this L2 fit nor predict_proba
        warnings.simplefilter("ignore", FutureWarning)
        model.fit((x - mean) / sd, y)
    probs = model.predict_proba((val_x.double().numpy() - mean) / sd)
    out[:, torch.from_numpy(model.classes_.astype(np.int64))] = torch.from_numpy(probs)
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count one half);
    None when one side is empty. The Mann-Whitney form: P(score of a positive > score of a negative)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def class_metrics(scores: torch.Tensor, labels: torch.Tensor, categories: list[str]) -> dict:
    """top1 / top5 / balanced accuracy (mean per-class recall) in percent, the person-vs-rest AUROC
    (percent, when a category is named "person") and a per-category table, for (N, C) ``scores``."""
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(1)
    per_class = {}
    for c in labels.unique().tolist():
        sel = labels == c
        per_class[categories[c]] = {"count": int(sel.sum()), "top1": round(100.0 * float(hit1[sel].float().mean()), 2)}
    result: dict = {
        "top1": round(100.0 * float(hit1.float().mean()), 2),
        "top5": round(100.0 * float(hit5.float().mean()), 2),
        "balanced": round(float(np.mean([v["top1"] for v in per_class.values()])), 2),
        "person_auroc": None,
    }
    if "person" in categories:
        p = categories.index("person")
        share = scores[:, p] / scores.sum(1).clamp(min=1e-30)  # kNN votes -> a share; probabilities stay
        value = auroc(share.double().numpy(), (labels == p).numpy())
        result["person_auroc"] = None if value is None else round(100.0 * value, 2)
    result["per_class"] = dict(sorted(per_class.items(), key=lambda kv: -kv[1]["count"]))
    return result


def majority(train_labels: torch.Tensor, val_labels: torch.Tensor, categories: list[str]) -> dict:
    """The floor every readout must beat: always answering the train set's most frequent class."""
    c = int(torch.bincount(train_labels, minlength=len(categories)).argmax())
    present = len(val_labels.unique())
    return {
        "class": categories[c],
        "top1": round(100.0 * float((val_labels == c).float().mean()), 2),
        # recall 100 for that class, 0 for the others
        "balanced": round(100.0 / present if (val_labels == c).any() else 0.0, 2),
    }


def keep_frequent(train_labels: torch.Tensor, val_labels: torch.Tensor, categories: list[str], min_instances: int):
    """(train keep mask, val keep mask, kept class names, {dropped class: train count}) for the
    classes with at least ``min_instances`` train objects (0 or 1: every class with a train object)."""
    counts = torch.bincount(train_labels, minlength=len(categories))
    kept = counts >= max(1, min_instances)
    dropped = {categories[c]: int(counts[c]) for c in range(len(categories)) if not kept[c] and counts[c] > 0}
    names = [categories[c] for c in range(len(categories)) if kept[c]]
    return kept[train_labels], kept[val_labels], names, dropped


def handmade_features(crops: torch.Tensor) -> torch.Tensor:
    """A descriptor made by hand, the probe's "pixels" floor: an 8x8x8 RGB colour histogram
    (normalised) + HOG of the grey crop (scikit-image: 9 orientations, cells of 1/6 of the side,
    2x2 blocks), for (N, 3, S, S) uint8 crops."""
    out = []
    for crop in crops.numpy():
        rgb = crop.transpose(1, 2, 0)
        bins = (rgb // 32).astype(np.int64)
        hist = np.bincount((bins[..., 0] * 64 + bins[..., 1] * 8 + bins[..., 2]).ravel(), minlength=512)
        grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        cell = max(4, rgb.shape[0] // 6)
        h = hog(grey, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True)
        out.append(np.concatenate([hist / hist.sum(), h]).astype(np.float32))
    return torch.from_numpy(np.stack(out))
