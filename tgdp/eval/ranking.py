"""Retrieval similarity and metrics (method.md 5.1): diagonal-mean cosine, ranks of the true match,
R@K and median rank, computed in row chunks so a 20k x 20k evaluation never holds the full matrix.

Embeddings are `[N, F, D]`: N clips, F time-aligned (frame k, audio window k) pairs, D channels,
each pair L2-normalised. The TG-DP / CAV-MAE Sync similarity of query i and candidate j is

    S[i, j] = (1 / F) * sum_k <q[i, k], c[j, k]>          (F = 16; F = 1 gives plain cosine)

computed as ONE matrix product of the flattened [N, F * D] matrices, as the official
`diag_mean_cosine` does. The true match of query i is candidate i (row i's diagonal).

Ranks and ties. For each query we count, in the SAME chunk of S that holds its diagonal value
(so rounding can never make S[i, i] differ from itself), `greater` = #{j : S[i, j] > S[i, i]} and
`ties` = #{j != i : S[i, j] == S[i, i]}. The 0-based rank of the true match is then

    pessimistic (default)  greater + ties      ties count against the query: a collapsed model
                                               (all similarities equal) scores 0, never 100
    optimistic             greater             ties count for the query (the official code's
                                               result when ties exist only after the match)
    mean                   greater + ties / 2  expected rank under uniformly random tie-breaking;
                                               R@K is then the exact probability of a hit

R@K = percentage of queries with rank < K (for `mean`: the mean hit probability); MR (median rank)
= median(rank) + 1, 1-based, `np.median` semantics (an even count averages the middle two), as
the official `compute_metrics`. With real-valued features ties do not occur and all three agree
with the published definition. Every policy is deterministic: no order of the data matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TIE_POLICIES = ("pessimistic", "optimistic", "mean")
DEFAULT_KS = (1, 5, 10)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (each pair's embedding), in float32."""
    return F.normalize(x.float(), dim=-1)


def as_pairs(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, 1, D]; [N, F, D] unchanged."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3:
        raise ValueError(f"embeddings must be [N, D] or [N, F, D], got shape {tuple(x.shape)}")
    return x


def diag_mean_similarity(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The full [Nq, Nc] diagonal-mean similarity (for small sets, plots and tests)."""
    q, c = as_pairs(queries).float(), as_pairs(candidates).float()
    if q.shape[1:] != c.shape[1:]:
        raise ValueError(f"queries {tuple(q.shape)} and candidates {tuple(c.shape)} differ in [F, D]")
    return q.flatten(1) @ c.flatten(1).T / q.shape[1]


@dataclass
class MatchCounts:
    """Per query: candidates scoring strictly above the true match, and other candidates tied with it."""

    greater: torch.Tensor  # int64 [N]
    ties: torch.Tensor  # int64 [N]

    def ranks(self, policy: str = "pessimistic") -> torch.Tensor:
        """0-based rank of the true match under a tie policy (float64 for `mean`)."""
        if policy == "pessimistic":
            return self.greater + self.ties
        if policy == "optimistic":
            return self.greater.clone()
        if policy == "mean":
            return self.greater.double() + self.ties.double() / 2
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {policy!r}")


@torch.no_grad()
def match_counts(queries: torch.Tensor, candidates: torch.Tensor, chunk_rows: int = 1024,
                 rows: tuple[int, int] | None = None) -> MatchCounts:
    """Counts for query rows [start, end) (all by default) against every candidate, chunk by chunk.

    queries, candidates: [N, F, D] (or [N, D]), already L2-normalised per pair; query i's true
    match is candidate i. Peak extra memory is one [chunk_rows, N] float32 block (80 MB for
    1024 x 20k), whatever N is. Runs on the embeddings' device.
    """
    q, c = as_pairs(queries), as_pairs(candidates)
    n = q.shape[0]
    if c.shape[0] != n or q.shape[1:] != c.shape[1:]:
        raise ValueError(f"queries {tuple(q.shape)} and candidates {tuple(c.shape)} must match (paired sets)")
    start, end = rows if rows is not None else (0, n)
    c_flat = c.flatten(1).float()  # [N, F * D]
    greater = torch.zeros(end - start, dtype=torch.int64, device=q.device)
    ties = torch.zeros_like(greater)
    for lo in range(start, end, max(1, chunk_rows)):
        hi = min(lo + max(1, chunk_rows), end)
        sim = q[lo:hi].flatten(1).float() @ c_flat.T  # [c, N]; the 1/F factor does not change any order
        idx = torch.arange(lo, hi, device=q.device)
        diag = sim[idx - lo, idx].unsqueeze(1)  # from the same block: bitwise the value being compared
        greater[lo - start:hi - start] = (sim > diag).sum(1)
        ties[lo - start:hi - start] = (sim == diag).sum(1) - 1
    return MatchCounts(greater.cpu(), ties.cpu())


def recall_metrics(counts: MatchCounts, ks: tuple[int, ...] | list[int] = DEFAULT_KS,
                   policy: str = "pessimistic") -> dict[str, float]:
    """{"R@K": percent, ..., "MR": median rank (1-based), "MnR": mean rank (1-based), "queries": N}."""
    n = int(counts.greater.numel())
    if n == 0:
        raise ValueError("no queries")
    out: dict[str, float] = {}
    g, t = counts.greater.double(), counts.ties.double()
    ranks = counts.ranks(policy).double()
    for k in ks:
        if policy == "mean":  # the true match's position is uniform over g .. g + t (0-based)
            hit = ((k - g) / (t + 1)).clamp(0, 1)
        else:
            hit = (ranks < k).double()
        out[f"R@{k}"] = 100.0 * float(hit.mean())
    out["MR"] = float(np.median(ranks.numpy())) + 1.0
    out["MnR"] = float(ranks.mean()) + 1.0
    out["queries"] = n
    return out


def top_matches(queries: torch.Tensor, candidates: torch.Tensor, rows: list[int], k: int) -> list[list[int]]:
    """Indices of the k best candidates of each listed query (ties broken by lower index: display only)."""
    q, c = as_pairs(queries), as_pairs(candidates)
    sim = diag_mean_similarity(q[rows], c)  # [len(rows), N]
    order = torch.sort(-sim, dim=1, stable=True).indices[:, :k]
    return order.tolist()
