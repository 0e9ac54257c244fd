"""SoCo's object-level BYOL loss (paper section 3.3, eq. 5-6) and the released code's variant.

For a pair of views (a, b), the term in one direction is

    mean over valid proposals i of  -2 cos(q(g(h_i^a)), g_xi(h_i^b))

(online prediction of view a against the target projection of view b). The pair contributes both
directions (a -> b and b -> a: the paper's L and L~), and the loss sums over the pairs:
(V1, V2), (V1, V3) for SoCo-FPN, plus (V1, V4) for SoCo*, and (V1, V2) only for SoCo-C4.

Each direction lies in [-2, 2], so with P pairs the loss lies in [-4P, 4P]: identical embeddings
give the minimum -4P (-8 for FPN, -12 for SoCo*, -4 for C4), orthogonal ones 0, opposite ones
+4P. The paper's eq. 5 writes the two pairs of one direction per proposal and eq. 6 averages
over K; summing eq. 5 over proposals then dividing by K is the same as our per-pair means.

Modes (the loss *unit* each mode averages over):
- ``"paper"``: the unit is a valid proposal: the mean over every valid proposal of the batch (each
  proposal weighs the same; with no padding it equals eq. 6 averaged over images).
- ``"released"`` (hologerry/SoCo): the unit is an image: per image, the mean cosine over its valid
  proposals, then the mean over the images of the batch (an image without a valid proposal
  contributes 0 and still counts, as the released code's ``sum / (count + 1e-6)``; we drop its
  1e-6). Differs from the paper only when images have different numbers of valid proposals.

The batch is the *global* batch of an optimiser step: every accumulated micro-batch on every
process. A valid proposal is a slot whose box is present in every view (``valid`` (B, K)), so
every pair of views and both directions average over the same N units, and

    L = sum over pairs (a, b) of  (1 / N) sum over units u of  loss_ab(u)

where loss_ab(u) is the sum of both directions' -2 cos for unit u (its proposal's, or the mean
over its image's valid proposals). ``reduction="sum"`` returns the numerator of each term (sum
over the units of this micro-batch) and :func:`loss_count` the micro-batch's N; the training step
(train/loop.py) adds both over micro-batches and processes, so the loss and its gradient do not
depend on how the batch is split (tests/test_loss_split.py). ``reduction="mean"`` (the default)
is the mean over the units of the tensors given: the global loss when they are the whole batch.

Cosines are computed in float32 whatever the autocast dtype. Padded slots are excluded with
``torch.where`` (not a multiplication), so garbage (even NaN) in them cannot leak in. Nothing here
synchronises with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("paper", "released")
REDUCTIONS = ("mean", "sum")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float32: (R, D), (R, D) -> (R,)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def _rows(num_rows: int, valid: torch.Tensor | None, device) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """(mask over rows or None = all valid, image index of each row or None, number of images).

    Rows are either every slot (num_rows == B*K, row-major; ``valid`` masks them) or only the valid
    slots in row-major order (num_rows == valid.sum(); what the model passes).
    """
    if valid is None:
        return None, None, 0
    B, K = valid.shape
    if num_rows == B * K:
        return valid.flatten(), torch.arange(B, device=device).repeat_interleave(K), B
    # Gathered rows: the image of row r is the number of images whose valid slots end at or before r.
    ends = valid.sum(1).cumsum(0)
    image = torch.searchsorted(ends, torch.arange(num_rows, device=device), right=True)
    return None, image, B


def loss_count(valid: torch.Tensor | None, mode: str = "paper", num_rows: int | None = None) -> torch.Tensor:
    """The loss units of a (micro-)batch, the denominator of the mean (a device tensor, no sync).

    "paper": the valid proposals (``valid.sum()``, or ``num_rows`` when ``valid`` is None: all
    rows valid); "released": the images (``valid.shape[0]``, images without a valid proposal
    included).
    """
    if mode not in MODES:
        raise ValueError(f"model.loss must be one of {', '.join(MODES)}, got {mode!r}")
    if valid is None:
        if mode == "released":
            raise ValueError("loss mode 'released' needs valid_per_image to group proposals by image")
        return torch.tensor(num_rows if num_rows is not None else 0)  # a CPU scalar: no copy to a device
    if mode == "released":
        return torch.full((), valid.shape[0], dtype=torch.int64, device=valid.device)  # a fill, no copy
    return valid.sum()


def full_count(mode: str, images: int, proposals_per_image: int) -> int:
    """:func:`loss_count` of ``images`` images whose ``proposals_per_image`` slots are all valid."""
    if mode not in MODES:
        raise ValueError(f"model.loss must be one of {', '.join(MODES)}, got {mode!r}")
    return images * proposals_per_image if mode == "paper" else images


def direction_term(
    pred: torch.Tensor,
    proj: torch.Tensor,
    valid: torch.Tensor | None = None,
    mode: str = "paper",
    reduction: str = "mean",
) -> torch.Tensor:
    """-2 x cosine between the online predictions of one view and the target projections of another,
    summed over the loss units (``reduction="sum"``) or averaged over them (``"mean"``: the sum
    divided by :func:`loss_count`, at least 1)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    mask, image, num_images = _rows(pred.shape[0], valid, pred.device)
    if mask is not None:
        # Zero the padded rows before the cosine: masking only its output would still let a NaN
        # in a padded row through the backward pass (0 * NaN).
        pred = torch.where(mask[:, None], pred, torch.zeros_like(pred))
        proj = torch.where(mask[:, None], proj, torch.zeros_like(proj))
    cos = cosine(pred, proj)  # padded rows: exactly 0 (normalize of a zero vector is zero)
    if mode == "paper":
        total = -2.0 * cos.sum()
    elif mode == "released":
        if image is None:
            raise ValueError("loss mode 'released' needs valid_per_image to group proposals by image")
        ones = torch.ones_like(cos) if mask is None else mask.to(cos.dtype)
        sums = cos.new_zeros(num_images).index_add_(0, image, cos)
        counts = cos.new_zeros(num_images).index_add_(0, image, ones)
        total = -2.0 * (sums / counts.clamp(min=1)).sum()
    else:
        raise ValueError(f"model.loss must be one of {', '.join(MODES)}, got {mode!r}")
    if reduction == "sum":
        return total
    return total / loss_count(valid, mode, pred.shape[0]).clamp(min=1)


def soco_loss_terms(
    online_preds: list[torch.Tensor],
    target_projs: list[torch.Tensor],
    pairs: list[tuple[int, int]],
    valid_per_image: torch.Tensor | None = None,
    mode: str = "paper",
    reduction: str = "mean",
) -> dict[str, torch.Tensor]:
    """One term per pair, both directions summed; keys like ``"loss_12"`` (1-based view numbers).

    Every term is over the same units (see the module docstring), so with ``reduction="sum"``
    dividing each by the batch's :func:`loss_count` gives the ``"mean"`` terms."""
    terms = {}
    for a, b in pairs:
        terms[f"loss_{a + 1}{b + 1}"] = direction_term(
            online_preds[a], target_projs[b], valid_per_image, mode, reduction
        ) + direction_term(online_preds[b], target_projs[a], valid_per_image, mode, reduction)
    return terms


def soco_loss(
    online_preds: list[torch.Tensor],
    target_projs: list[torch.Tensor],
    pairs: list[tuple[int, int]],
    valid_per_image: torch.Tensor | None = None,
    mode: str = "paper",
    reduction: str = "mean",
) -> torch.Tensor:
    """The symmetric SoCo loss, a scalar in [-4P, 4P] for P pairs (minimum -4P at identical embeddings).

    online_preds[v], target_projs[v]: (R, D) for view v, rows = the same proposals in every view
    (all B*K slots, masked by ``valid_per_image`` (B, K), or only the valid ones in row-major order).
    pairs: view index pairs, e.g. [(0, 1), (0, 2)]; each is used in both directions.
    ``valid_per_image`` is optional in "paper" mode when all rows are valid, required in "released".
    ``reduction="sum"``: the sum over the loss units instead (divide by :func:`loss_count`).
    """
    return sum(soco_loss_terms(online_preds, target_projs, pairs, valid_per_image, mode, reduction).values())
