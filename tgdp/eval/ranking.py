"""Retrieval similarity and metrics (docs/method.md 5.1): diagonal-mean cosine, ranks of the true match,
R@K and median rank, computed in tiles so a 20k x 20k evaluation never holds the full matrix.

Embeddings are `[N, F, D]`: N clips, F time-aligned (frame k, audio window k) pairs, D channels,
each pair L2-normalised. The TG-DP / CAV-MAE Sync similarity of query i and candidate j is

    S[i, j] = (1 / F) * sum_k <q[i, k], c[j, k]>          (F = 16; F = 1 gives plain cosine)

computed as ONE matrix product of the flattened [N, F * D] matrices, as the official
`diag_mean_cosine` does. The true match of query i is candidate i (row i's diagonal).

Ranks and ties. For each query we count `greater` = #{j : S[i, j] > S[i, i]} and
`ties` = #{j != i : S[i, j] == S[i, i]}, in tiles of S (`paired_match_counts`: one pass gives both
directions, the second from the transpose of the same values, as the official code). The 0-based
rank of the true match is then

    pessimistic (default)  greater + ties      ties count against the query: a collapsed model
                                               (all similarities equal) scores 0, never 100
    optimistic             greater             ties count for the query (the best case)
    mean                   greater + ties / 2  expected rank under uniformly random tie-breaking;
                                               R@K is then the exact probability of a hit

R@K = percentage of queries with rank < K (for `mean`: the mean hit probability); MR (median rank)
= median(rank) + 1, 1-based, `np.median` semantics (an even count averages the middle two), as
the official `compute_metrics`. Without ties all three equal the published definition; exact
float32 ties are rare but do happen at 20k x 20k (docs/benchmarks.md), where the official code
counts the row once per tied position. Every policy is deterministic: no order of the data matters.
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
def paired_match_counts(queries: torch.Tensor, candidates: torch.Tensor, tile: int = 2048,
                        row_tiles: list[int] | None = None) -> tuple[MatchCounts, MatchCounts]:
    """Counts of BOTH directions from ONE pass over the similarity matrix, tile by tile.

    queries, candidates: [N, F, D] (or [N, D]), L2-normalised per pair; pair i matches pair i.
    S is cut into `tile` x `tile` tiles on one grid for rows and columns. Diagonal tiles come
    first and give every S[i, i]; each other tile S[R, C] then adds to the row counts of R
    (query -> candidate direction, against S[r, r]) AND the column counts of C (candidate ->
    query direction, against S[c, c]). So candidate -> query is computed from exactly the
    transpose of the same values, as the official `S_video = S_audio.T`, at the cost of one
    product, and a value is compared with its own diagonal only inside the tile that holds both
    (no rounding can make S[i, i] differ from itself). Peak extra memory: one tile (16 MB at 2048).

    row_tiles: the row-tile indices to process (all by default). A subset gives partial counts
    (rows outside it get none; columns get only those rows' contributions): several ranks
    processing disjoint subsets sum their results to the full counts.
    """
    q, c = as_pairs(queries).flatten(1).float(), as_pairs(candidates).flatten(1).float()
    n = q.shape[0]
    if candidates.shape != queries.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and candidates {tuple(candidates.shape)} must match "
                         "(paired sets)")
    tile = max(1, tile)
    bounds = [(lo, min(lo + tile, n)) for lo in range(0, n, tile)]
    mine = range(len(bounds)) if row_tiles is None else sorted(set(row_tiles))
    zeros = lambda: torch.zeros(n, dtype=torch.int64, device=q.device)  # noqa: E731
    g_row, t_row, g_col, t_col = zeros(), zeros(), zeros(), zeros()
    diag = torch.empty(n, dtype=torch.float32, device=q.device)
    for k, (lo, hi) in enumerate(bounds):
        if row_tiles is not None and k not in mine:  # only S[i, i] is needed from others' diagonal tiles
            block = q[lo:hi] @ c[lo:hi].T
            diag[lo:hi] = block.diagonal()
            continue
        block = q[lo:hi] @ c[lo:hi].T
        d = block.diagonal().clone()
        diag[lo:hi] = d
        g_row[lo:hi] += (block > d[:, None]).sum(1)
        t_row[lo:hi] += (block == d[:, None]).sum(1) - 1
        g_col[lo:hi] += (block > d[None, :]).sum(0)
        t_col[lo:hi] += (block == d[None, :]).sum(0) - 1
    for r in mine:
        rlo, rhi = bounds[r]
        dr = diag[rlo:rhi, None]
        for k, (clo, chi) in enumerate(bounds):
            if k == r:
                continue
            block = q[rlo:rhi] @ c[clo:chi].T  # S[R, C]
            dc = diag[None, clo:chi]
            g_row[rlo:rhi] += (block > dr).sum(1)
            t_row[rlo:rhi] += (block == dr).sum(1)
            g_col[clo:chi] += (block > dc).sum(0)
            t_col[clo:chi] += (block == dc).sum(0)
    return MatchCounts(g_row.cpu(), t_row.cpu()), MatchCounts(g_col.cpu(), t_col.cpu())


def match_counts(queries: torch.Tensor, candidates: torch.Tensor, tile: int = 2048) -> MatchCounts:
    """Query -> candidate counts only (see `paired_match_counts`)."""
    return paired_match_counts(queries, candidates, tile)[0]


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
