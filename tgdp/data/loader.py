"""The streaming WebDataset loader: config, per-worker streams and the resumable `ShardLoader`.

Pipeline of one worker (a pure function of seed, epoch, rank and worker, see sampling.py):

    shards (epoch: its disjoint slice, cycled; resampled: drawn with replacement)
      -> tar members (tar_reader.py; only fbank.npy / frame_XX.jpg / json are read)
      -> samples grouped by key -> shuffle buffer of RAW bytes -> skip (resume) -> decode -> batch

Usage:

    loader = ShardLoader(cfg, rank, world_size)
    for epoch in ...:
        for batch in loader:    # the rest of the current epoch, then the epoch counter advances
            ...
        checkpoint["data"] = loader.state_dict()   # any time, also mid-epoch

Batches (collated inside the worker; B = batch_size, F = num_frames, T = audio_frames, S = frame_size):

    audio          float32 [B, T, 128]        retrieval: [B, F, T, 128]   normalised fbank windows
    frames         float32 [B, 3, S, S]       retrieval: [B, F, 3, S, S]  ImageNet-normalised
    frame_index    int64   [B]                retrieval: [B, F]           stored frame of each pair (frames.py)
    keys           list[str]; labels: list[list[str]] (from the sample json)
    label_targets  float32 [B, C] multi-hot   only with data.label_csv (labels.py; unknown labels: an error
                                              when the index records its labels, else warned once)
    skipped        int: corrupt samples its worker skipped so far this epoch (rank total: `.skipped`)

Exact resume: a batch carries its worker's stream position (raw samples consumed after the
shuffle). The loader records the position of the last batch it handed out per worker; a new loader
with the same layout replays each worker's stream and skips that many raw samples without decoding
them, so the following batches are bitwise those of an uninterrupted run.

State dict: {version, epoch, batches (consumed in the epoch), batches_per_epoch, seed, rank,
world_size, num_workers (streams, min 1), batch_size, mode, split, total_samples,
workers: [{batches, position, skipped, shard_errors} per worker], skipped, shard_errors} - plain ints
and strings. num_workers=0 and 1 give the same single stream, so their states are interchangeable.

Layout changes (world_size, num_workers, batch_size, mode, split or the data's size differ from the
checkpoint): streams are different, so an exact continuation does not exist. `on_layout_change`
decides: "fast_forward" (default) keeps the epoch and skips the same FRACTION of it in the new
layout (the epoch keeps its sample budget and ends on schedule; which samples fall in the skipped
part differs); "restart" replays the epoch from its first batch; "error" refuses. A warning names
the differences. A state from another rank with the same layout keeps epoch and batch count but
derives positions assuming no corrupt samples (exact unless that rank skipped some).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import multiprocessing as mp
import os
import random
import select
import signal
import threading
import time
import weakref
from multiprocessing import forkserver, resource_tracker
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tgdp.config import ConfigError
from tgdp.data.config import DataConfig
from tgdp.data import sampling as S
from tgdp.data.labels import check_shard_labels
from tgdp.data.transforms import SAMPLE_ERRORS, LabelVocab, SampleDecoder, collate

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Stop requests for the training process: Slurm's warning (SIGUSR1, `sbatch --signal`), and
# SIGTERM (scancel, preemption, torchrun's forwarding). torchrun signals each rank's whole process
# group (os.killpg) and Slurm every process of the job step, so the decoder processes, their
# forkserver and the resource tracker get them too. Dying of one would turn the rank's clean stop
# into "DataLoader worker exited unexpectedly", so every helper keeps both blocked. A decoder
# reads its SIGTERM in a thread (`_follow_rank`) and exits only when the rank itself sent it (the
# DataLoader's shutdown, multiprocessing's exit handler) or when the rank is gone; the forkserver
# and the resource tracker end when the rank and its decoders have (their pipes close).
WORKER_BLOCKED_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM})
# A worker that sees this many corrupt samples in a row is reading systematically wrong data
# (e.g. shards of another format); stop instead of spinning forever.
MAX_CONSECUTIVE_BAD = 1000
# How often a rank waiting for a batch looks up from the wait: for a stop request, and to check
# the wait against data.wait_timeout_s.
WAIT_POLL_S = 1.0
# The exit code of a rank whose loader waited past data.wait_timeout_s (train.py uses it too).
EXIT_DATA_STALL = 5


class DataWaitTimeout(RuntimeError):
    """The rank waited longer than data.wait_timeout_s for a batch; the message names the decoder
    worker, the shard and the member it is stuck in."""


class DataWaitInterrupted(Exception):
    """A stop was requested while the rank waited for a batch: the wait was given up."""


# ----------------------------------------------------------------------------- worker side


class _Progress:
    """Where each stream is (opening a shard, reading one of its members, decoding a sample), in
    memory the rank shares with its decoder processes, so a rank waiting for a late batch can name
    what the worker is stuck in. One fixed slot per stream, written only by its worker: a stage
    byte, the pid, the shard, and the member or sample key (the only field written per member)."""

    SLOT, PID, SHARD, DETAIL = 1024, 1, 16, 528  # slot size and field offsets
    STAGES = {b"o": "opening", b"r": "reading", b"d": "decoding"}

    def __init__(self, streams: int, shared_with: Any = None):
        size = streams * self.SLOT
        self._buf = shared_with.RawArray("c", size) if shared_with is not None else bytearray(size)
        self._view: memoryview | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_view": None}  # a memoryview does not pickle; rebuilt on first use

    def _put(self, at: int, text: str, end: int) -> None:
        if self._view is None:
            self._view = memoryview(self._buf).cast("B")
        data = text.encode("utf-8", "backslashreplace")[: end - at - 1] + b"\0"
        self._view[at:at + len(data)] = data

    def shard(self, stream: int, stage: bytes, shard: str, detail: str = "") -> None:
        """Opening `shard` (stage b"o"), or decoding sample `detail` of it (b"d")."""
        base = stream * self.SLOT
        self._put(base + self.PID, str(os.getpid()), base + self.SHARD)
        self._put(base + self.SHARD, shard, base + self.DETAIL)
        self._put(base + self.DETAIL, detail, base + self.SLOT)
        self._view[base] = stage[0]  # type: ignore[index]

    def member(self, stream: int, name: str) -> None:
        """Reading member `name` of the shard last opened (per tar member: kept cheap)."""
        base = stream * self.SLOT
        self._put(base + self.DETAIL, name, base + self.SLOT)
        self._view[base] = 0x72  # type: ignore[index]  # b"r"

    def describe(self, stream: int) -> str:
        slot = bytes(self._buf[stream * self.SLOT:(stream + 1) * self.SLOT])
        field = lambda a, b: slot[a:b].split(b"\0", 1)[0].decode("utf-8", "replace")  # noqa: E731
        stage, pid, shard, detail = slot[:1], field(self.PID, self.SHARD), field(self.SHARD, self.DETAIL), \
            field(self.DETAIL, self.SLOT)
        if stage not in self.STAGES:
            return f"decoder worker {stream} has not started reading"
        where = {b"o": f"is opening shard {shard} (before its first member)",
                 b"r": f"is reading member {detail} of shard {shard}",
                 b"d": f"is decoding sample {detail} of shard {shard}"}[stage]
        return f"decoder worker {stream} (pid {pid}) {where}"


class _Streams(IterableDataset):
    """The per-worker batch streams of one rank for one epoch (re-created every epoch)."""

    def __init__(self, cfg: DataConfig, shards: list[S.ShardEntry], plan: S.EpochPlan, rank: int,
                 vocab: LabelVocab | None, epoch: int, rotate: int, resume: list[S.WorkerResume],
                 progress: _Progress):
        self.cfg, self.shards, self.plan, self.rank = cfg, shards, plan, rank
        self.vocab, self.epoch, self.rotate, self.resume = vocab, epoch, rotate, resume
        self.progress = progress

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        torch_id, n = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader serves workers round-robin from torch worker 0; rotating the logical ids makes
        # a resumed loader continue with the stream that was next in the interrupted run.
        worker = (torch_id + self.rotate) % n
        return self._batches(worker, self.resume[worker])

    def _shuffled(self, worker: int, stats: S.StreamStats) -> Iterator[dict[str, Any]]:
        """The worker's raw samples after the shuffle buffer (infinite)."""
        cfg, plan = self.cfg, self.plan
        rng = random.Random(S.derive_seed(cfg.seed, self.epoch, self.rank, worker, S.TAG_BUFFER))

        def read(shards: list[S.ShardEntry], counter: list[int]) -> Iterator[dict[str, Any]]:
            for shard in shards:
                url = shard.url
                self.progress.shard(worker, b"o", url)
                members = functools.partial(self.progress.member, worker)
                for sample in S.read_shard(url, shard.samples, stats, on_member=members):
                    counter[0] += 1
                    yield sample

        if cfg.mode == "epoch":
            mine = S.epoch_shard_slice(self.shards, cfg.seed, self.epoch, self.rank, worker,
                                       plan.world_size, plan.streams)
            while True:  # cycle so every worker yields exactly its quota; each pass drains the buffer
                got = [0]  # so the whole slice comes out before any sample is repeated
                yield from S.shuffle_buffer(read(mine, got), cfg.shuffle_buffer, rng, cfg.shuffle_initial)
                if got[0] == 0:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: none of its shards is readable: "
                                       f"{[s.url for s in mine]}")
        else:
            draws = S.resampled_shards(self.shards, cfg.seed, self.epoch, self.rank, worker)

            def resampled() -> Iterator[dict[str, Any]]:
                misses = 0
                for shard in draws:
                    got = [0]
                    yield from read([shard], got)
                    misses = 0 if got[0] else misses + 1
                    if misses > 2 * len(self.shards) + 8:
                        raise RuntimeError(f"rank {self.rank} worker {worker}: {misses} shard draws in a row "
                                           "gave no sample")

            yield from S.shuffle_buffer(resampled(), cfg.shuffle_buffer, rng, cfg.shuffle_initial)

    def _batches(self, worker: int, resume: S.WorkerResume) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        stats = S.StreamStats(resume)
        stream = self._shuffled(worker, stats)
        position = 0
        stats.quiet = True
        while position < resume.position:  # replay without decoding: cheap and exact
            next(stream)
            position += 1
        stats.quiet = False
        decoder = SampleDecoder(cfg, self.vocab)
        seen_unknown: set[str] = set()
        for _ in range(self.plan.batches_per_stream - resume.batches):
            items, bad_run = [], 0
            while len(items) < cfg.batch_size:
                raw = next(stream)
                rng = S.sample_rng(cfg.seed, self.epoch, self.rank, worker, position)
                position += 1
                self.progress.shard(worker, b"d", raw.get("__url__", "?"), raw.get("__key__", "?"))
                try:
                    items.append(decoder(raw, rng))
                    bad_run = 0
                except SAMPLE_ERRORS as exc:
                    stats.skipped += 1
                    reason = f"{type(exc).__name__}: {exc}"
                    stats.events.append((raw.get("__url__", "?"), raw.get("__key__", "?"), reason))
                    bad_run += 1
                    if bad_run >= MAX_CONSECUTIVE_BAD:
                        raise RuntimeError(f"rank {self.rank} worker {worker}: {bad_run} corrupt samples in a row; "
                                           f"last: {stats.events[-1]}")
            batch = collate(items, self.vocab is not None)
            unknown = sorted({u for s in items for u in s.unknown_labels} - seen_unknown)
            seen_unknown.update(unknown)
            batch.update(skipped=stats.skipped, _worker=worker, _position=position, _shard_errors=stats.shard_errors,
                         _events=stats.events, _unknown_labels=unknown)
            stats.events = []
            yield batch


# ----------------------------------------------------------------------------- signals


def follow_rank_worker_init(rank_pid: int, worker_id: int) -> None:
    """Decoder processes leave stop requests to the training process, which checkpoints and then
    shuts them down itself, and end with it. Blocked rather than ignored: the mask also survives
    fork and exec, and lets `_follow_rank` read who sent a SIGTERM."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_BLOCKED_SIGNALS)
    threading.Thread(target=_follow_rank, args=(rank_pid,), name="tgdp-follow-rank", daemon=True).start()


def _follow_rank(rank_pid: int) -> None:
    """End this decoder when its rank sends SIGTERM (DataLoader shutdown, multiprocessing's exit
    handler) or is gone, even if the decoder is stuck in a read. Why: the decoder's parent is the
    forkserver, so PyTorch's own watchdog (`getppid()`) never sees the rank die, and the
    forkserver lives as long as any decoder holds its pipe: without this, both outlived a killed
    rank. SIGTERM from anyone else (a job-wide signal) is left to the rank."""
    try:
        rank = os.pidfd_open(rank_pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): poll the process instead
        rank = None
    while True:
        info = signal.sigtimedwait([signal.SIGTERM], WAIT_POLL_S)
        if info is not None and info.si_pid == rank_pid:
            os._exit(0)
        if not _alive(rank_pid, rank):
            os._exit(0)


def _alive(pid: int, pidfd: int | None) -> bool:
    if pidfd is not None:
        return not select.select([pidfd], [], [], 0)[0]  # readable once the process has ended
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def _worker_signals_blocked(start_method: str) -> Iterator[None]:
    """Block the stop signals in this thread while the DataLoader starts its helper processes
    (workers, and on first use the forkserver, whose death makes every worker it forked exit, and
    Python's resource tracker), which inherit the mask. A signal arriving meanwhile stays pending
    and is delivered on exit: the training process never loses a stop request.

    The resource tracker is started first, on its own: starting it UNBLOCKS SIGINT and SIGTERM in
    the calling thread (bpo-33613), which would leave the forkserver started right after it
    without SIGTERM blocked, so a job-wide SIGTERM killed it and every decoder it had forked."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_BLOCKED_SIGNALS)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_BLOCKED_SIGNALS)
        if start_method == "forkserver":
            forkserver.ensure_running()
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _InProcessWatch:
    """The data watchdog of a loader without decoder processes: the reading happens in the
    training process itself, so a stuck read cannot be given up. A thread checks the wait; past
    the bound it logs the report and ends the process with EXIT_DATA_STALL."""

    def __init__(self, bound: float, report: Callable[[float], str]):
        self.bound, self.report = bound, report
        self.since: float | None = None
        threading.Thread(target=_watch_in_process, args=(weakref.ref(self),), name="tgdp-data-watchdog",
                         daemon=True).start()

    def __enter__(self) -> None:
        self.since = time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        self.since = None


def _watch_in_process(ref: "weakref.ref[_InProcessWatch]") -> None:
    """The thread of an `_InProcessWatch`; it ends with its loader (a weak reference)."""
    while True:
        watch = ref()
        if watch is None:
            return
        bound, since = watch.bound, watch.since
        if since is not None and time.monotonic() - since > bound:
            log.error("%s; the loader reads in the training process (data.num_workers=0), which cannot give up "
                      "the read: exiting without a checkpoint", watch.report(time.monotonic() - since))
            logging.shutdown()
            os._exit(EXIT_DATA_STALL)
        del watch  # no strong reference while waiting: the loader can go and end this thread
        # A poll, not an event: the read being watched blocks the training thread itself, so
        # nothing can signal; the period bounds how late past data.wait_timeout_s the exit comes.
        time.sleep(min(WAIT_POLL_S, bound))


# ----------------------------------------------------------------------------- main process


class ShardLoader:
    """The resumable per-rank loader: iterate it once per epoch; `state_dict()` at any batch.

    A wait for one batch is bounded by `data.wait_timeout_s`: past it, iteration raises
    `DataWaitTimeout` naming the decoder worker, the shard and the member it is stuck in. With
    `stop_requested`, a wait is given up (`DataWaitInterrupted`) within WAIT_POLL_S of it returning
    true. With num_workers=0 the reading happens in this process and cannot be given up: past the
    bound the same message is logged and the process exits with EXIT_DATA_STALL.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 stop_requested: Callable[[], bool] | None = None):
        cfg = copy.deepcopy(cfg)  # load_state_dict may adopt the checkpoint's seed
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.shards = S.load_shard_set(cfg.shards)
        total = cfg.samples_per_epoch or sum(s.samples for s in self.shards)
        self.plan = S.EpochPlan(total, cfg.batch_size, world_size, max(1, cfg.num_workers))
        self.plan.check()
        if cfg.mode == "epoch":
            S.check_epoch_shards(len(self.shards), world_size, self.plan.streams)
        self.vocab = LabelVocab.from_csv(cfg.label_csv) if cfg.label_csv else None
        if self.vocab is not None:
            check_shard_labels(self.vocab, cfg.shards)  # labels outside the file: an error naming them, now
        self.epoch = 0
        self.batches = 0  # consumed in the current epoch
        self._workers = [S.WorkerResume() for _ in range(self.plan.streams)]
        self._skipped_before = 0  # totals of finished epochs (and of restored runs)
        self._shard_errors_before = 0
        self._unknown_labels: set[str] = set()
        self.stop_requested = stop_requested
        shared = mp.get_context(cfg.start_method) if cfg.num_workers else None
        self._progress = _Progress(self.plan.streams, shared)
        self._watch: _InProcessWatch | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank)."""
        return self.plan.batches_per_rank

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped on this rank since the first epoch (restored on resume)."""
        return self._skipped_before + sum(w.skipped for w in self._workers)

    @property
    def shard_errors(self) -> int:
        """Missing, empty, truncated or short shard reads on this rank since the first epoch."""
        return self._shard_errors_before + sum(w.shard_errors for w in self._workers)

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of `epoch` (not needed in a plain loop: iteration advances it)."""
        self._finish_epoch()
        self.epoch = epoch

    def _finish_epoch(self) -> None:
        self._skipped_before, self._shard_errors_before = self.skipped, self.shard_errors
        self.epoch += 1
        self.batches = 0
        self._workers = [S.WorkerResume() for _ in range(self.plan.streams)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batches >= len(self):
            self._finish_epoch()
        streams = self.plan.streams
        dataset = _Streams(self.cfg, self.shards, self.plan, self.rank, self.vocab, self.epoch,
                           self.batches % streams, [S.WorkerResume(**vars(w)) for w in self._workers],
                           self._progress)
        loader = DataLoader(dataset, batch_size=None, **self._loader_kwargs())
        with _worker_signals_blocked(self.cfg.start_method) if self.cfg.num_workers else contextlib.nullcontext():
            batches = iter(loader)  # starts the worker processes
        while True:
            batch = self._next_batch(batches)
            if batch is None:
                return
            self._account(batch)
            self.batches += 1
            if self.batches == len(self):
                self._finish_epoch()  # so a state_dict taken now resumes at the next epoch
            yield batch

    def _loader_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        kwargs: dict[str, Any] = {"num_workers": cfg.num_workers, "pin_memory": bool(cfg.pin_memory)}
        if cfg.num_workers > 0:
            kwargs["worker_init_fn"] = functools.partial(follow_rank_worker_init, os.getpid())
            ctx = mp.get_context(cfg.start_method)
            if cfg.start_method == "forkserver":  # import torch & co once in the server, not per worker
                ctx.set_forkserver_preload(["__main__", "tgdp.data.loader"])
            kwargs.update(multiprocessing_context=ctx, prefetch_factor=cfg.prefetch_factor, persistent_workers=False,
                          timeout=WAIT_POLL_S)  # a wait returns every WAIT_POLL_S (`_next_batch` goes on)
        return kwargs

    def _next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The next batch of the epoch (None at its end), waiting at most data.wait_timeout_s."""
        if not self.cfg.num_workers:
            if self._watch is None:
                self._watch = _InProcessWatch(self.cfg.wait_timeout_s, self._stall_report)
            with self._watch:
                return next(batches, None)
        started = time.monotonic()
        while True:
            try:
                return next(batches)
            except StopIteration:
                return None
            except RuntimeError as exc:
                if "DataLoader timed out" not in str(exc):  # a worker's error, or one that died
                    raise
            waited = time.monotonic() - started
            if self.stop_requested is not None and self.stop_requested():
                raise DataWaitInterrupted(f"stop requested after waiting {waited:.0f} s for a batch")
            if waited >= self.cfg.wait_timeout_s:
                raise DataWaitTimeout(self._stall_report(waited))

    def _stall_report(self, waited: float) -> str:
        """Which worker owes the next batch and what it is doing (the others follow)."""
        streams = self.plan.streams
        due = self.batches % streams  # batch i of the epoch comes from stream i % streams
        others = "; ".join(self._progress.describe(w) for w in range(streams) if w != due)
        return (f"rank {self.rank} waited {waited:.0f} s for a batch (data.wait_timeout_s="
                f"{self.cfg.wait_timeout_s:g}): {self._progress.describe(due)}"
                + (f". Other decoders: {others}" if others else "")
                + ". Check that shard's file system, or remove the shard from the index")

    def _account(self, batch: dict[str, Any]) -> None:
        """Record the batch's worker position and counters; report its problems in this process
        (worker processes have no logging configuration)."""
        w = self._workers[batch.pop("_worker")]
        w.batches += 1
        w.position = batch.pop("_position")
        w.skipped = batch["skipped"]
        w.shard_errors = batch.pop("_shard_errors")
        for url, key, reason in batch.pop("_events"):
            if key:
                log.warning("skipped corrupt sample key=%s shard=%s: %s", key, url, reason)
            else:
                log.warning("shard problem shard=%s: %s", url, reason)
        for label in batch.pop("_unknown_labels"):
            if label not in self._unknown_labels:
                self._unknown_labels.add(label)
                log.warning("label %r is not in data.label_csv %s; ignored", label, self.cfg.label_csv)

    # ------------------------------------------------------------------------- resume

    def _layout(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"world_size": self.world_size, "num_workers": self.plan.streams, "batch_size": cfg.batch_size,
                "mode": cfg.mode, "split": cfg.split, "total_samples": self.plan.total_samples}

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strings (torch.save / DCP / json friendly)."""
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "batches": self.batches, "seed": self.cfg.seed,
            "rank": self.rank, "batches_per_epoch": len(self), **self._layout(),
            "workers": [vars(w).copy() for w in self._workers],
            "skipped": self.skipped, "shard_errors": self.shard_errors,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["seed"] != self.cfg.seed:
            log.warning("data.seed %d differs from the checkpoint's %d: using the checkpoint's to resume exactly",
                        self.cfg.seed, state["seed"])
            self.cfg.seed = int(state["seed"])
        self.epoch, batches = int(state["epoch"]), int(state["batches"])
        total_skipped, total_shard_errors = int(state["skipped"]), int(state["shard_errors"])
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        streams = self.plan.streams
        if not changed and int(state["rank"]) == self.rank:
            self.batches = batches
            self._workers = [S.WorkerResume(**w) for w in state["workers"]]
        else:
            if changed:
                policy = self.cfg.on_layout_change
                detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
                if policy == "error":
                    raise ValueError(f"data layout changed since the checkpoint ({detail}); set data.on_layout_change "
                                     "to fast_forward or restart to continue with a different stream")
                old_len = int(state["batches_per_epoch"])
                batches = batches * len(self) // old_len if policy == "fast_forward" and old_len else 0
                where = "from the same fraction" if policy == "fast_forward" else "from its start"
                log.warning("data layout changed since the checkpoint (%s): epoch %d continues %s (batch %d of %d); "
                            "the exact sample order of an uninterrupted run cannot be reproduced",
                            detail, self.epoch, where, batches, len(self))
            else:
                log.warning("data loader state of rank %s loaded on rank %d: stream positions are derived assuming "
                            "no corrupt samples", state["rank"], self.rank)
            self.batches = batches
            self._workers = [S.WorkerResume(n, n * self.cfg.batch_size) for n in
                             (S.produced_by_stream(batches, w, streams) for w in range(streams))]
        self._skipped_before = total_skipped - sum(w.skipped for w in self._workers)
        self._shard_errors_before = total_shard_errors - sum(w.shard_errors for w in self._workers)
