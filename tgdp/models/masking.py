"""All masking of TG-DP in one place: which patches stay visible, and in what order.

Everything is MAE's recipe (docs/method.md 3.2): a per-sample permutation `ids_shuffle` of the L patch
indices, keep its first `len_keep = int(L * (1 - r))` entries, `ids_restore = argsort(ids_shuffle)`
undoes the shuffle, `mask` (1 = removed) is in original patch order. The regimes differ only in
how the permutation is chosen:

* random (reconstruction pass): argsort of uniform noise;
* structured audio (ablations): whole time columns / frequency rows of the audio grid forced to
  the back of the order before argsort (rows = frequency bands, cols = time patches; any grid);
* ranked (teacher-guided contrastive pass): the teacher's ranking of ORIGINAL patch indices by
  decreasing priority, so the highest-priority patches stay visible;
* random ranking (the "no teacher" ablation): a uniformly random ranking.

Randomness comes only from an explicit `torch.Generator`; `mask_generator` derives one from
(seed, step, rank, micro_batch, stream), so a resumed run replays the same masks from the step
number alone, and a recompute pass (gradient caching) can replay a micro-batch's masks.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

STRUCTURED_MODES = ("unstructured", "time", "freq", "tf")
RANK_MODES = ("deterministic", "gumbel", "random")


class Masking(NamedTuple):
    """One modality's mask for a batch. `ids_shuffle[:, :len_keep]` are the kept patches, in order."""

    ids_shuffle: torch.Tensor  # [B, L] long, original patch indices in processing order
    ids_restore: torch.Tensor  # [B, L] long, inverse permutation of ids_shuffle
    mask: torch.Tensor  # [B, L] float, 1 = removed, 0 = visible, original patch order
    len_keep: int

    @property
    def ids_keep(self) -> torch.Tensor:
        return self.ids_shuffle[:, : self.len_keep]  # [B, len_keep]


def num_kept(num_patches: int, ratio: float) -> int:
    """int(L * (1 - r)) with Python float arithmetic, exactly as the official code (r=0.75: 208 -> 52)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return int(num_patches * (1 - ratio))


def masking_from_order(ids_shuffle: torch.Tensor, len_keep: int) -> Masking:
    """Build the full `Masking` from a per-sample permutation [B, L] whose first len_keep are kept."""
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.zeros(ids_shuffle.shape, device=ids_shuffle.device)
    mask.scatter_(1, ids_shuffle[:, len_keep:], 1.0)
    return Masking(ids_shuffle, ids_restore, mask, len_keep)


def apply_masking(x: torch.Tensor, masking: Masking) -> torch.Tensor:
    """Visible tokens [B, len_keep, D] of x [B, L, D], in the masking's processing order."""
    index = masking.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, index)


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str | None) -> torch.Tensor:
    """Uniform noise drawn on the GENERATOR's device (CPU by default: masks do not depend on the
    accelerator), then moved to `device`.

    CPU -> CUDA goes through pinned memory, non-blocking: torch follows a copy from pageable
    memory with a stream synchronisation, so the host would wait here for every kernel queued so
    far (the teacher pass) and the GPU would idle while the host queues the student's passes.
    The values are the same either way (the generator draws on the CPU in both cases).
    """
    target = None if device is None else torch.device(device)
    pinned = target is not None and target.type == "cuda" and generator.device.type == "cpu"
    noise = torch.rand(shape, generator=generator, device=generator.device, pin_memory=pinned)
    return noise if target is None else noise.to(target, non_blocking=pinned)


def random_masking(batch: int, num_patches: int, ratio: float, generator: torch.Generator,
                   device: torch.device | str | None = None) -> Masking:
    """Unstructured per-sample random masking (MAE): ids_shuffle = argsort(uniform noise)."""
    noise = _uniform((batch, num_patches), generator, device)
    return masking_from_order(torch.argsort(noise, dim=1), num_kept(num_patches, ratio))


def structured_masking(batch: int, grid: tuple[int, int], ratio: float, mode: str, generator: torch.Generator,
                       device: torch.device | str | None = None) -> Masking:
    """Audio masking on a (rows = frequency, cols = time) grid; token index = row * cols + col.

    'time' drops int(cols * r) whole time columns, 'freq' int(rows * r) whole frequency rows, 'tf'
    int(cols * r * 0.7) columns and int(rows * r * 0.7) rows (the official fractions); the rest of
    the budget is filled at random, so exactly L - int(L * (1 - r)) patches are removed. If more
    patches are forced than the budget ('tf' on 8 x 64 at r = 0.75 forces 388 > 384), some forced
    patches stay visible, as in the official code. The official code hard-codes a 8 x 64 grid
    (T = 1024); this works for any grid.
    """
    if mode not in STRUCTURED_MODES:
        raise ValueError(f"audio mask mode must be one of {STRUCTURED_MODES}, got {mode!r}")
    rows, cols = grid
    if mode == "unstructured":
        return random_masking(batch, rows * cols, ratio, generator, device)
    noise = _uniform((batch, rows, cols), generator, device)
    frac = 0.7 if mode == "tf" else 1.0
    if mode in ("time", "tf"):
        noise = torch.where(_random_subset(batch, cols, int(cols * ratio * frac), generator, noise.device)[:, None, :],
                            1.1, noise)
    if mode in ("freq", "tf"):
        noise = torch.where(_random_subset(batch, rows, int(rows * ratio * frac), generator, noise.device)[:, :, None],
                            1.1, noise)
    # 1.1 > any uniform value: forced patches sort last, i.e. are removed first.
    return masking_from_order(torch.argsort(noise.reshape(batch, rows * cols), dim=1), num_kept(rows * cols, ratio))


def _random_subset(batch: int, n: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[B, n] bool with exactly k uniformly chosen True entries per row."""
    picks = torch.argsort(_uniform((batch, n), generator, device), dim=1)[:, :k]
    return torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, picks, True)


def ranked_masking(ranks: torch.Tensor, ratio: float) -> Masking:
    """Teacher-guided masking: keep the top int(L * (1 - r)) of `ranks`.

    ranks [B, L]: ORIGINAL patch indices sorted by decreasing priority (see `rank_patches`). The
    official `ranked_masking` is missing from the release; this is its intended semantics
    (docs/method.md 3.3). With the identity ranking it keeps the first len_keep patches in order.
    """
    return masking_from_order(ranks, num_kept(ranks.shape[1], ratio))


def random_ranks(batch: int, num_patches: int, generator: torch.Generator,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """A uniformly random ranking [B, L] (the "random, no teacher" ablation)."""
    return torch.argsort(_uniform((batch, num_patches), generator, device), dim=1)


def priority_probs(scores: torch.Tensor, temperature: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """softmax(s / tau) [B, N], the Plackett-Luce weights of Gumbel ranking (official `probs`)."""
    return torch.softmax(scores.float() / max(temperature, eps), dim=-1)


def rank_patches(scores: torch.Tensor, mode: str = "deterministic", temperature: float = 1.0,
                 generator: torch.Generator | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Ranks [B, N] (patch indices by decreasing priority) from teacher priorities s [B, N].

    * 'deterministic': argsort(s, descending) (stable, so ties resolve by index on every device).
    * 'gumbel': argsort(s / tau + g, descending), g ~ Gumbel(0, 1) from `generator`: a sample of a
      full permutation without replacement with weights softmax(s / tau) (Gumbel-top-k); equal to
      the official `log(softmax(s / tau)) + g` up to a per-row constant. tau -> 0 gives the
      deterministic ranking. NOTE on tau: s is a head-mean attention probability, ~1 / (N + 1)
      (~0.005 for N = 208), so the official tau = 1.0 makes the logits differ by < 1 and the
      ranking is close to uniform; tau ~ 1e-3 .. 1e-2 keeps the teacher's preference visible.
    * 'random': a uniformly random ranking (ignores s).
    """
    if mode not in RANK_MODES:
        raise ValueError(f"rank mode must be one of {RANK_MODES}, got {mode!r}")
    if mode == "deterministic":
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
    if generator is None:
        raise ValueError(f"rank mode {mode!r} draws random numbers: pass an explicit generator")
    if mode == "random":
        return random_ranks(scores.shape[0], scores.shape[1], generator, scores.device)
    u = _uniform(tuple(scores.shape), generator, scores.device).clamp(eps, 1.0 - eps)
    keys = scores.float() / max(temperature, eps) - torch.log(-torch.log(u))
    return torch.sort(keys, dim=1, descending=True, stable=True).indices


def derive_seed(seed: int, step: int, rank: int, micro_batch: int, stream: int | str) -> int:
    """A 64-bit seed from the integers naming one draw (fixed scheme: BLAKE2b-64 of a text key).

    Hashing (rather than e.g. seed + step) keeps nearby tuples statistically independent and makes
    the scheme independent of torch's RNG internals; `stream` separates the draws of one step
    (e.g. 'recon', 'contrastive', 'gumbel').
    """
    key = f"tgdp-mask/v1/{int(seed)}/{int(step)}/{int(rank)}/{int(micro_batch)}/{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def mask_generator(seed: int, step: int, rank: int, micro_batch: int, stream: int | str = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one (seed, step, rank, micro_batch, stream): exact resume needs only the step.

    Default device CPU: the mask noise is then identical on every accelerator type, and its size
    (B x L floats) makes the host-to-device copy negligible.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, step, rank, micro_batch, stream))
    return generator
