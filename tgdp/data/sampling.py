"""Shard reading and assignment, epoch arithmetic, seeds and the shuffle buffer of the loader.

Everything here is a pure function of (seed, epoch, rank, worker) so that a worker's stream can
be rebuilt bit for bit after a restart: that is what makes exact resume possible without saving
any RNG state (webdataset's own shufflers draw from process-global or stateful RNGs and cannot be
replayed, see webdataset issues #177 and #271).

Epoch length (both modes): with `S` samples in the index (or `samples_per_epoch`), `B` the per-rank
batch size, `R` ranks and `N` streams per rank (`max(1, num_workers)`), every rank yields

    batches_per_rank = floor(S / (B * R)) rounded DOWN to a multiple of N

batches, i.e. each stream yields exactly batches_per_rank / N batches. Rounding down (never up)
keeps every rank's count equal, so no rank waits in a collective for a batch that never comes.
"""

from __future__ import annotations

import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from webdataset.tariterators import base_plus_ext

from tgdp.config import ConfigError
from tgdp.data import format as shard_format
from tgdp.data.tar_reader import iter_members

T = TypeVar("T")

# Domain-separation tags: one seed per purpose, so changing e.g. the shuffle buffer size never
# changes which shards are drawn.
TAG_SHARD_ORDER = 1
TAG_RESAMPLE = 2
TAG_BUFFER = 3
TAG_SAMPLE = 4
# Only these members are ever read; everything else (e.g. a .pyd/.pth that would need pickle) is
# skipped at the tar level and never even loaded into memory.
_KNOWN_MEMBER = re.compile(r"\.(fbank\.npy|json|frame_\d\d\.jpg)$")


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from non-negative integers (numpy SeedSequence: well mixed, platform-stable)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def sample_rng(seed: int, epoch: int, rank: int, worker: int, index: int) -> np.random.Generator:
    """The generator of one sample: stateless, so skipping samples never changes later ones."""
    return np.random.default_rng([seed, epoch, rank, worker, TAG_SAMPLE, index])


@dataclass(frozen=True)
class ShardEntry:
    """One shard file and its sample count from the index."""

    url: str
    samples: int


def load_shard_set(spec: str) -> list[ShardEntry]:
    """All shards of one or several shard folders (`dirA,dirB`), read from their index.json."""
    entries: list[ShardEntry] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        index = shard_format.read_index(Path(part))
        entries.extend(ShardEntry(str(index.root / s.name), s.samples) for s in index.shards)
    if not entries:
        raise ConfigError(f"data.shards={spec!r} lists no shards (empty index)")
    return entries


@dataclass(frozen=True)
class EpochPlan:
    """How many batches each rank and each of its streams yields per epoch (module docstring)."""

    total_samples: int
    batch_size: int
    world_size: int
    streams: int  # streams per rank = max(1, num_workers)

    @property
    def batches_per_rank(self) -> int:
        per_rank = self.total_samples // (self.batch_size * self.world_size)
        return per_rank // self.streams * self.streams

    @property
    def batches_per_stream(self) -> int:
        return self.batches_per_rank // self.streams

    def check(self) -> None:
        if self.batches_per_rank < 1:
            raise ConfigError(
                f"an epoch would have no batches: {self.total_samples} samples < batch_size {self.batch_size} "
                f"x world_size {self.world_size} x streams {self.streams} (num_workers, min 1); "
                "lower data.batch_size or data.num_workers, or add data"
            )


def produced_by_stream(consumed: int, stream: int, streams: int) -> int:
    """Batches stream `stream` has produced after `consumed` batches taken round-robin from the
    DataLoader (batch i comes from stream i % streams)."""
    return max(0, (consumed - stream + streams - 1) // streams)


def check_epoch_shards(num_shards: int, world_size: int, streams: int) -> None:
    """Epoch mode gives every (rank, worker) a disjoint slice of the shard list; with fewer shards
    than streams some rank would have nothing to read and the job would hang (webdataset#188)."""
    needed = world_size * streams
    if num_shards < needed:
        raise ConfigError(
            f"data.mode=epoch needs at least world_size x num_workers = {world_size} x {streams} = {needed} "
            f"shards, but data.shards has {num_shards}: lower data.num_workers to <= {max(1, num_shards // world_size)}"
            ", use data.mode=resampled, or re-shard into more, smaller shards (make_shards max_samples_per_shard)"
        )


def epoch_shard_slice(shards: Sequence[ShardEntry], seed: int, epoch: int, rank: int, worker: int,
                      world_size: int, streams: int) -> list[ShardEntry]:
    """Epoch mode: the shard list shuffled with (seed, epoch) - the same permutation on every rank -
    and the disjoint slice of global stream `rank * streams + worker`."""
    order = np.random.default_rng([seed, epoch, TAG_SHARD_ORDER]).permutation(len(shards))
    stream = rank * streams + worker
    return [shards[i] for i in order[stream :: world_size * streams]]


def resampled_shards(shards: Sequence[ShardEntry], seed: int, epoch: int, rank: int,
                     worker: int) -> Iterator[ShardEntry]:
    """Resampled mode: shards drawn with replacement, weighted by sample count (so a small last shard
    is not over-sampled), from a generator private to (seed, epoch, rank, worker)."""
    rng = random.Random(derive_seed(seed, epoch, rank, worker, TAG_RESAMPLE))
    weights = [max(0, s.samples) for s in shards]
    if sum(weights) == 0:
        weights = [1] * len(shards)
    while True:
        yield rng.choices(shards, weights=weights)[0]


def shuffle_buffer(items: Iterable[T], bufsize: int, rng: random.Random, initial: int = 100) -> Iterator[T]:
    """webdataset's shuffle (start emitting after `initial` items, then grow to `bufsize` by reading
    two per output) with an explicit generator, so the output order is replayable."""
    if bufsize <= 1:
        yield from items
        return
    initial = max(1, min(initial, bufsize))
    it = iter(items)
    buf: list[T] = []
    for item in it:
        buf.append(item)
        if len(buf) < bufsize:
            if len(buf) < initial:
                continue
            try:
                buf.append(next(it))
            except StopIteration:
                pass
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()
    while buf:
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


# ----------------------------------------------------------------------------- reading


@dataclass
class WorkerResume:
    """Where a worker's stream restarts: raw samples already consumed and counters so far."""

    batches: int = 0
    position: int = 0
    skipped: int = 0
    shard_errors: int = 0


class StreamStats:
    """A worker's counters and the problems to report with its next batch. `quiet` is set while a
    resumed worker replays what the checkpointed run had already counted and reported."""

    def __init__(self, resume: WorkerResume):
        self.skipped = resume.skipped
        self.shard_errors = resume.shard_errors
        self.events: list[tuple[str, str, str]] = []  # (url, key, reason)
        self.quiet = False

    def shard_problem(self, url: str, reason: str) -> None:
        if not self.quiet:
            self.shard_errors += 1
            self.events.append((url, "", reason))


def read_shard(url: str, expected: int, stats: StreamStats,
               on_member: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard, grouped by key. A missing, empty, truncated or short shard is reported
    once and yields what it could; a sample cut by truncation lacks members and is rejected (with
    its key) at decode time. `on_member(name)` is called before each member is read."""
    count, current, problem = 0, None, ""
    try:
        with open(url, "rb") as fh:
            for name, data in iter_members(fh, select=_KNOWN_MEMBER.search, on_member=on_member):
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                if current is None or current["__key__"] != key:
                    if current is not None:
                        count += 1
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
    except (OSError, tarfile.TarError, EOFError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if current is not None:
        count += 1
        yield current
    if problem:
        stats.shard_problem(url, f"unreadable after {count} of {expected} samples ({problem})")
    elif count == 0:
        stats.shard_problem(url, "empty shard (no samples)")
    elif expected and count != expected:
        stats.shard_problem(url, f"read {count} samples, the index says {expected}")
