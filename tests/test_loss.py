"""SoCo loss on hand-built embeddings (paper eq. 5-6; released-code normalisation)."""

from __future__ import annotations

import math

import pytest
import torch

from soco_pretrain.model.loss import cosine, direction_term, soco_loss, soco_loss_terms

FPN_PAIRS = [(0, 1), (0, 2)]
STAR_PAIRS = [(0, 1), (0, 2), (0, 3)]
C4_PAIRS = [(0, 1)]


def _views(n_views: int, rows: int, dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g) for _ in range(n_views)]


@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("pairs, minimum", [(FPN_PAIRS, -8.0), (STAR_PAIRS, -12.0), (C4_PAIRS, -4.0)])
def test_identical_embeddings_give_the_minimum(pairs, minimum, mode):
    n_views = max(max(p) for p in pairs) + 1
    x = _views(1, 6)[0]
    views = [x * (v + 1) for v in range(n_views)]  # same directions, different norms
    valid = torch.ones(2, 3, dtype=torch.bool)
    loss = soco_loss(views, [v.clone() for v in views], pairs, valid, mode)
    assert loss.item() == pytest.approx(minimum, abs=1e-5)


def test_orthogonal_give_zero_and_opposite_give_the_maximum():
    preds = [torch.eye(4)[:2], torch.eye(4)[:2], torch.eye(4)[:2]]
    ortho = [torch.eye(4)[2:], torch.eye(4)[2:], torch.eye(4)[2:]]
    assert soco_loss(preds, ortho, FPN_PAIRS).item() == pytest.approx(0.0, abs=1e-6)
    opposite = [-p for p in preds]
    assert soco_loss(preds, opposite, FPN_PAIRS).item() == pytest.approx(8.0, abs=1e-5)


def test_hand_computed_value_on_three_proposals():
    # Direction 1 -> 2: cosines 1, 0, 1/sqrt(2); direction 2 -> 1: cosines 1, 1/sqrt(2), -1.
    pred1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    proj2 = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pred2 = torch.tensor([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    proj1 = torch.tensor([[0.0, 2.0], [1.0, 0.0], [1.0, 0.0]])
    r = 1 / math.sqrt(2)
    expected = -2 * (1 + 0 + r) / 3 - 2 * (1 + r - 1) / 3  # = -1.609476...
    loss = soco_loss([pred1, pred2], [proj1, proj2], C4_PAIRS)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_matches_a_per_proposal_loop_over_eq_5():
    # Independent oracle: eq. 5 written per proposal with torch's own cosine_similarity, in float64.
    preds, projs = _views(3, 5, dim=6, seed=7), _views(3, 5, dim=6, seed=8)
    expected = 0.0
    for a, b in FPN_PAIRS:
        for i in range(5):
            for p, z in ((preds[a][i], projs[b][i]), (preds[b][i], projs[a][i])):
                expected += -2 * torch.nn.functional.cosine_similarity(p.double(), z.double(), dim=0).item() / 5
    assert soco_loss(preds, projs, FPN_PAIRS).item() == pytest.approx(expected, abs=1e-5)


def test_symmetric_in_the_two_views_of_a_pair():
    preds, projs = _views(3, 5, seed=1), _views(3, 5, seed=2)
    a = soco_loss(preds, projs, FPN_PAIRS)
    b = soco_loss(preds, projs, [(1, 0), (2, 0)])
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    terms = soco_loss_terms(preds, projs, FPN_PAIRS)
    assert set(terms) == {"loss_12", "loss_13"}
    expected = direction_term(preds[0], projs[1]) + direction_term(preds[1], projs[0])
    assert terms["loss_12"].item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_masked_slots_change_nothing(mode):
    B, K, D = 3, 4, 8
    valid = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    n = int(valid.sum())
    preds, projs = _views(3, n, D, seed=3), _views(3, n, D, seed=4)
    gathered = soco_loss(preds, projs, FPN_PAIRS, valid, mode)

    def scatter(rows, fill):
        full = torch.full((B * K, D), fill)
        full[valid.flatten()] = rows
        return full

    for fill in (0.0, 1e6, float("nan")):
        full_preds = [scatter(p, fill).requires_grad_() for p in preds]
        full_loss = soco_loss(full_preds, [scatter(z, fill) for z in projs], FPN_PAIRS, valid, mode)
        assert full_loss.item() == pytest.approx(gathered.item(), abs=1e-5)
        full_loss.backward()
        for p in full_preds:  # padded rows get exactly zero gradient, never NaN
            assert torch.isfinite(p.grad).all()
            assert (p.grad[~valid.flatten()] == 0).all()


def test_paper_and_released_normalisation():
    # Image 0: two valid proposals with cosines 1 and 0; image 1: one valid proposal with cosine -1.
    valid = torch.tensor([[True, True], [True, False]])
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    proj = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    preds, projs = [pred, pred], [proj, proj]  # both directions see the same cosines
    paper = soco_loss(preds, projs, C4_PAIRS, valid, "paper")
    released = soco_loss(preds, projs, C4_PAIRS, valid, "released")
    assert paper.item() == pytest.approx(2 * -2 * (1 + 0 - 1) / 3, abs=1e-6)  # 0
    assert released.item() == pytest.approx(2 * -2 * ((0.5 + -1.0) / 2), abs=1e-6)  # +1
    # All slots valid and equal counts: the two modes agree.
    full = torch.ones(2, 3, dtype=torch.bool)
    preds, projs = _views(2, 6, seed=5), _views(2, 6, seed=6)
    assert soco_loss(preds, projs, C4_PAIRS, full, "paper").item() == pytest.approx(
        soco_loss(preds, projs, C4_PAIRS, full, "released").item(), abs=1e-6
    )


def test_released_image_without_valid_proposal_counts_as_zero():
    valid = torch.tensor([[True, True], [False, False]])
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    term = direction_term(pred, pred.clone(), valid, "released")
    assert term.item() == pytest.approx(-2 * (1.0 + 0.0) / 2, abs=1e-6)  # (mean 1 + 0) / 2 images


def test_errors_and_dtype():
    x = _views(2, 4)
    with pytest.raises(ValueError, match="released"):
        soco_loss(x, x, C4_PAIRS, None, "released")
    with pytest.raises(ValueError, match="model.loss"):
        soco_loss(x, x, C4_PAIRS, None, "other")
    half = [x[0].to(torch.bfloat16)] * 2
    out = soco_loss(half, half, C4_PAIRS)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(-4.0, abs=1e-5)
    assert cosine(torch.zeros(1, 3), torch.ones(1, 3)).item() == 0.0  # zero vector: no NaN


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_sum_over_micro_batches_divided_by_their_units_is_the_batch_mean(mode):
    # The global batch's loss (eq. 5 summed over pairs, averaged over the loss units: valid
    # proposals, or images for released) from any split into micro-batches: sums and units add.
    from soco_pretrain.model.loss import full_count, loss_count

    valid = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    preds, projs = _views(3, valid.numel(), seed=9), _views(3, valid.numel(), seed=10)
    whole = soco_loss(preds, projs, FPN_PAIRS, valid, mode)
    for split in ([4], [1, 1, 1, 1], [1, 3], [2, 2]):
        total, units, start = 0.0, 0, 0
        for n in split:
            rows = slice(start * 3, (start + n) * 3)
            part = valid[start : start + n]
            total += soco_loss([p[rows] for p in preds], [z[rows] for z in projs], FPN_PAIRS, part, mode, "sum")
            units += int(loss_count(part, mode))
            start += n
        assert units == (6 if mode == "paper" else 4)
        assert (total / units).item() == pytest.approx(whole.item(), abs=1e-5), split
    # The per-micro-batch means this replaces weigh the units of small micro-batches more.
    means = [
        soco_loss(
            [p[i * 3 : i * 3 + 3] for p in preds],
            [z[i * 3 : i * 3 + 3] for z in projs],
            FPN_PAIRS,
            valid[i : i + 1],
            mode,
        )
        for i in range(4)
    ]
    if mode == "paper":
        assert abs(sum(m.item() for m in means) / 4 - whole.item()) > 0.05
    assert full_count(mode, 4, 3) == (12 if mode == "paper" else 4)
    assert int(loss_count(torch.ones(4, 3, dtype=torch.bool), mode)) == full_count(mode, 4, 3)


def test_sum_reduction_terms_and_errors():
    valid = torch.tensor([[True, True], [True, False]])
    preds, projs = _views(3, 4, seed=11), _views(3, 4, seed=12)
    sums = soco_loss_terms(preds, projs, FPN_PAIRS, valid, "paper", reduction="sum")
    means = soco_loss_terms(preds, projs, FPN_PAIRS, valid, "paper")
    for key in means:
        assert (sums[key] / 3).item() == pytest.approx(means[key].item(), abs=1e-6)
    assert soco_loss(preds[:2], projs[:2], C4_PAIRS, reduction="sum").item() == pytest.approx(
        4 * soco_loss(preds[:2], projs[:2], C4_PAIRS).item(), abs=1e-5
    )  # no mask: every row is a unit
    with pytest.raises(ValueError, match="reduction"):
        soco_loss(preds, projs, FPN_PAIRS, valid, "paper", reduction="none")
