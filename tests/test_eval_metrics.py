"""Retrieval and classification metric oracles (docs/method.md 5.1): no model, no files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgdp.eval.classification import average_precision, mean_average_precision, top1_accuracy
from tgdp.eval.ranking import (MatchCounts, diag_mean_similarity, match_counts, normalise, paired_match_counts,
                               recall_metrics, top_matches)


def counts_from_matrix(sim: torch.Tensor) -> MatchCounts:
    """The counts straight from a full similarity matrix (rows = queries, true match on the diagonal)."""
    diag = sim.diagonal().unsqueeze(1)
    return MatchCounts((sim > diag).sum(1), (sim == diag).sum(1) - 1)


def orthonormal(n: int, f: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalise(torch.randn(n, f, d, generator=g))


def test_identity_similarity_gives_perfect_recall_and_mr_1():
    x = orthonormal(50, 4, 32)
    counts = match_counts(x, x, tile=7)
    m = recall_metrics(counts, (1, 5, 10))
    assert (m["R@1"], m["R@5"], m["R@10"], m["MR"], m["MnR"]) == (100.0, 100.0, 100.0, 1.0, 1.0)


def test_true_item_always_sixth_gives_known_recalls():
    n = 30
    sim = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) * 0.5
    for i in range(n):  # exactly 5 candidates above the true match, all distinct
        others = [j for j in range(n) if j != i][:5]
        sim[i, others] = torch.tensor([0.9, 0.91, 0.92, 0.93, 0.94])
        sim[i, i] = 0.8
    m = recall_metrics(counts_from_matrix(sim))
    assert (m["R@1"], m["R@5"], m["R@10"], m["MR"]) == (0.0, 0.0, 100.0, 6.0)


def test_known_rank_mix_and_even_median():
    # 0-based ranks 0, 0, 3, 7 -> R@1 50, R@5 75, R@10 100, MR = median(0,0,3,7) + 1 = 2.5
    counts = MatchCounts(torch.tensor([0, 0, 3, 7]), torch.zeros(4, dtype=torch.int64))
    m = recall_metrics(counts, (1, 5, 10))
    assert (m["R@1"], m["R@5"], m["R@10"], m["MR"], m["MnR"]) == (50.0, 75.0, 100.0, 2.5, 3.5)


def test_tie_policies_are_deterministic_and_documented():
    # a collapsed model: every similarity equal -> each query has n - 1 ties and nothing greater
    n = 10
    counts = counts_from_matrix(torch.ones(n, n))
    assert counts.greater.tolist() == [0] * n and counts.ties.tolist() == [n - 1] * n
    pess = recall_metrics(counts, (1, 5), "pessimistic")
    opt = recall_metrics(counts, (1, 5), "optimistic")
    mean = recall_metrics(counts, (1, 5), "mean")
    assert (pess["R@1"], pess["R@5"], pess["MR"]) == (0.0, 0.0, 10.0)
    assert (opt["R@1"], opt["R@5"], opt["MR"]) == (100.0, 100.0, 1.0)
    # random tie-breaking: the true item is uniform over positions 1..10 -> P(top K) = K / 10
    assert mean["R@1"] == pytest.approx(10.0) and mean["R@5"] == pytest.approx(50.0) and mean["MR"] == 5.5
    # one tie partner and one greater: positions 2 or 3 with equal probability
    c = MatchCounts(torch.tensor([1]), torch.tensor([1]))
    assert recall_metrics(c, (1, 2, 3), "mean")["R@2"] == pytest.approx(50.0)
    assert recall_metrics(c, (1, 2, 3), "mean")["R@3"] == pytest.approx(100.0)
    assert recall_metrics(c, (2,), "pessimistic")["R@2"] == 0.0
    assert recall_metrics(c, (2,), "optimistic")["R@2"] == 100.0


def test_ties_counted_from_the_exact_same_block_as_the_diagonal():
    # duplicated pairs: 0 and 5 are the same clip -> each has exactly one tie, in every tiling
    x = orthonormal(9, 2, 8, seed=3)
    x[5] = x[0]
    for chunk in (1, 2, 4, 9, 100):
        for counts in paired_match_counts(x, x, tile=chunk):
            assert counts.ties[0] == 1 and counts.ties[5] == 1 and int(counts.ties[1:5].sum()) == 0


def naive_diag_mean(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CAV-MAE Sync's get_agg_sim_mat('diagonal_mean'): a Python loop over the F frame pairs."""
    n, f, _ = a.shape
    sim = torch.zeros(n, n, dtype=torch.float64)
    for k in range(f):
        sim += a[:, k].double() @ v[:, k].double().T
    return sim / f


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
def test_chunked_diag_mean_equals_naive_loop(chunk):
    a, v = orthonormal(37, 16, 24, seed=4), orthonormal(37, 16, 24, seed=5)
    v = normalise(0.6 * a + 0.4 * v)  # correlated pairs: a realistic mix of ranks
    ref = naive_diag_mean(a, v)
    assert torch.allclose(diag_mean_similarity(a, v).double(), ref, atol=1e-5)
    a2v, v2a = paired_match_counts(a, v, tile=chunk)
    for ours, exact in ((a2v, counts_from_matrix(ref)), (v2a, counts_from_matrix(ref.T))):  # V->A: the transpose
        assert torch.equal(ours.greater, exact.greater) and torch.equal(ours.ties, exact.ties)
    # row tiles dealt to 3 "ranks": the partial counts sum to the whole, in both directions
    n_tiles = -(-37 // chunk)
    parts = [paired_match_counts(a, v, chunk, list(range(r, n_tiles, 3))) for r in range(3)]
    assert torch.equal(sum(p[0].greater for p in parts), a2v.greater)
    assert torch.equal(sum(p[1].greater for p in parts), v2a.greater)
    assert torch.equal(sum(p[1].ties for p in parts), v2a.ties)


def test_identical_frames_reduce_to_single_frame_cosine():
    a1, v1 = orthonormal(12, 1, 16, seed=6), orthonormal(12, 1, 16, seed=7)
    a16, v16 = a1.expand(-1, 16, -1), v1.expand(-1, 16, -1)
    assert torch.allclose(diag_mean_similarity(a16, v16), diag_mean_similarity(a1, v1), atol=1e-6)
    assert torch.equal(match_counts(a16, v16).greater, match_counts(a1[:, 0], v1[:, 0]).greater)


def test_top_matches_lists_best_candidates_first():
    x = orthonormal(8, 1, 8, seed=8)
    top = top_matches(x, x, [0, 3], k=3)
    assert top[0][0] == 0 and top[1][0] == 3 and len(top[0]) == 3


# ------------------------------------------------------------------------------ classification
def test_average_precision_matches_hand_computation():
    # scores ranked: 0.9(+) 0.8(-) 0.7(+) 0.6(-) 0.5(+); P = 3
    # hits at ranks 1, 3, 5 -> AP = (1/1 + 2/3 + 3/5) / 3
    scores = np.array([0.5, 0.9, 0.6, 0.8, 0.7])
    targets = np.array([1, 1, 0, 0, 1])
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_average_precision_groups_tied_scores_like_sklearn():
    # scores 0.9(+), then a tie at 0.5 between one positive and one negative, then 0.1(+); P = 3.
    # Thresholds at distinct scores: 0.9 -> (R 1/3, P 1); 0.5 -> (R 2/3, P 2/3); 0.1 -> (R 1, P 3/4)
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/4
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    targets = np.array([1, 0, 1, 1])
    assert average_precision(scores, targets) == pytest.approx(1 / 3 + 2 / 9 + 1 / 4)
    with pytest.raises(ValueError):
        average_precision(scores, np.zeros(4))


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.6, 0.7, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    # class 0: positives at scores 0.9, 0.6 ranked 1, 2 -> AP 1; class 1: positive 0.8 ranked 1 -> AP 1
    value, skipped = mean_average_precision(scores, targets)
    assert value == pytest.approx(100.0) and skipped == 1
    targets[2] = [0, 1, 0]  # class 1: scores 0.8(+) 0.7(+) 0.1 -> AP 1; class 0: 0.9(+) only -> AP 1
    scores[2] = [0.95, 0.7, 0.2]  # class 0 now: 0.95(-) 0.9(+) -> AP 1/2
    assert mean_average_precision(scores, targets)[0] == pytest.approx(100.0 * (0.5 + 1.0) / 2)


def test_top1_accuracy_with_indices_and_one_hot():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]])
    assert top1_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)
    assert top1_accuracy(logits, torch.eye(2)[[0, 1, 0]]) == pytest.approx(100.0)
