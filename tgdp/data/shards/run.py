"""The make_shards run: plan -> parallel extraction -> ordered shard writing -> index + report."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tgdp.config import to_dict
from tgdp.data.format import FORMAT_VERSION, META_EXT, REPORT_NAME, ContentSummary, ShardInfo, write_index, \
    write_json_atomic
from tgdp.data.shards.config import ShardingConfig
from tgdp.data.shards.extract import ClipError, extract_clip
from tgdp.data.shards.parts import part_name, task_slice
from tgdp.data.shards.sources import Clip, ManifestError, keep_ids, read_clips, read_id_list
from tgdp.data.shards.writer import (
    Journal,
    JournalEntry,
    RollingShardWriter,
    plan_fingerprint,
    remove_stale_temporaries,
    sample_size,
    summarise_shard,
)

log = logging.getLogger("tgdp.make_shards")

# Parameters that change the bytes of the output; anything else (workers, progress) may differ
# between a run and its resume.
_OUTPUT_PARAMS = ("prefix", "clip_seconds", "seed", "shuffle", "max_samples_per_shard", "max_bytes_per_shard",
                  "frames", "audio")


@dataclass
class RunResult:
    shards: list[ShardInfo]
    failures: list[dict[str, str]]
    resumed_from_shard: int
    total_clips: int
    output: Path
    notes: list[str] = field(default_factory=list)
    content: ContentSummary = field(default_factory=ContentSummary)  # clips per frame count and label
    frame_gaps: list[dict[str, Any]] = field(default_factory=list)  # clips stored with missing frames

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def make_plan(clips: list[Clip], cfg: ShardingConfig) -> list[Clip]:
    """Clip order of the shard set: the manifest order, shuffled with the seed; a cluster task
    (num_tasks > 1) keeps its contiguous slice of that order (tgdp/data/shards/parts.py)."""
    order = list(clips)
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(order)
    return order[task_slice(len(order), cfg.task_index, cfg.num_tasks)]


def output_dir(cfg: ShardingConfig) -> Path:
    """Where this run writes: `output`, or its part folder for a task of a cluster run."""
    out = Path(cfg.output)
    return out / part_name(cfg.task_index, cfg.num_tasks) if cfg.num_tasks > 1 else out


def _init_worker() -> None:
    # One process per core already; intra-op threads would only oversubscribe the cores.
    torch.set_num_threads(1)
    # A forkserver started by the training loader in this process (tgdp.data.loader) keeps the
    # stop signals blocked, and its children inherit that mask. These workers must die of
    # SIGTERM: Pool.terminate ends them with it, and scancel's job-wide SIGTERM should too.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR1})


def _extract(job: tuple[Clip, ShardingConfig]) -> tuple[dict[str, bytes] | None, dict[str, str] | None]:
    clip, cfg = job
    try:
        return extract_clip(clip, cfg), None
    except ClipError as exc:
        return None, _failure(clip, str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad input must never stop the run; it is reported
        return None, _failure(clip, f"unexpected {type(exc).__name__}: {exc}")


def _failure(clip: Clip, reason: str) -> dict[str, str]:
    return {"key": clip.key, "video_id": clip.video_id, "source": clip.source, "reason": reason}


def _results(plan: list[Clip], start: int, cfg: ShardingConfig) -> Iterator[tuple]:
    jobs = ((clip, cfg) for clip in plan[start:])
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1:
        _init_worker()
        yield from map(_extract, jobs)
        return
    ctx = mp.get_context(cfg.start_method)
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        # imap keeps plan order, so the shard set does not depend on worker timing.
        yield from pool.imap(_extract, jobs, chunksize=1)


def make_shards(cfg: ShardingConfig) -> RunResult:
    """Run (or resume) a sharding job; see data_tools/make_shards.py for the command line."""
    out = output_dir(cfg)
    clips = read_clips(cfg.input)  # before creating anything: a bad manifest leaves no empty folder behind
    missing_ids: list[str] = []
    if cfg.ids:
        clips, missing_ids = keep_ids(clips, read_id_list(cfg.ids))
        if missing_ids:
            log.warning("%d ids of %s are not in %s (listed in report.json `missing_ids`)", len(missing_ids),
                        cfg.ids, cfg.input)
        if not clips:
            raise ManifestError(f"none of the ids in {cfg.ids} matches a clip of {cfg.input} (by video id or key)")
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(clips, cfg)
    params = {k: v for k, v in to_dict(cfg).items() if k in _OUTPUT_PARAMS}
    journal = Journal(out, plan_fingerprint([c.key + "\0" + c.source for c in plan], params))
    journal.load_or_start()
    notes = [f"removed unfinished shard {n}" for n in remove_stale_temporaries(out)]
    done = journal.entries
    start = done[-1].plan_end if done else 0
    if done:
        missing = [e.shard.name for e in done if e.shard.samples and not (out / e.shard.name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{out}: finished shards {missing} are gone; delete {out} (or its journal) to rebuild from scratch"
            )
        notes.append(f"resuming after {len(done)} finished shards ({start} of {len(plan)} clips done)")
    for note in notes:
        log.info(note)

    writer = RollingShardWriter(out, cfg.prefix, cfg.max_samples_per_shard, cfg.max_bytes_per_shard, len(done))
    pending_failures: list[dict[str, str]] = []
    content, gaps = ContentSummary(), []  # of the open shard
    position = start
    failed = sum(len(e.failures) for e in done)
    bar = tqdm(total=len(plan), initial=start, unit="clip", disable=not cfg.progress, dynamic_ncols=True,
               desc=f"sharding -> {out.name}")
    with logging_redirect_tqdm():
        try:
            for sample, failure in _results(plan, start, cfg):
                if failure is not None:
                    pending_failures.append(failure)
                    failed += 1
                    log.warning("skipped %s: %s", failure["source"], failure["reason"])
                else:
                    if writer.would_overflow(sample_size(sample)):
                        journal.record(JournalEntry(writer.finish(), position, pending_failures, content, gaps))
                        pending_failures, content, gaps = [], ContentSummary(), []
                    writer.write(sample)
                    meta = json.loads(sample[META_EXT])
                    content.add(meta)
                    if meta.get("missing_frames"):
                        gaps.append({"key": meta["key"], "video_id": meta["video_id"], "source": meta["source"],
                                     "missing": meta["missing_frames"], "kept": meta["num_frames"]})
                        log.warning("%s: frame folders %s have no file for this clip; kept its %d other frames",
                                    meta["source"], meta["missing_frames"], meta["num_frames"])
                position += 1
                bar.update(1)
                bar.set_postfix(shards=writer.index, unusable=failed, refresh=False)
            info = writer.finish()
            if info is not None or pending_failures:
                journal.record(JournalEntry(info or ShardInfo("", 0, 0), position, pending_failures, content, gaps))
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()

    shards = [e.shard for e in journal.entries if e.shard.samples]
    failures = [f for e in journal.entries for f in e.failures]
    frame_gaps = [g for e in journal.entries for g in e.frame_gaps]
    total = ContentSummary()
    for e in journal.entries:
        if e.shard.samples:  # journals of older versions lack the counts: read them from the shard
            total.merge(e.content if e.content is not None else summarise_shard(out / e.shard.name))
    run_params = {"format": FORMAT_VERSION, **to_dict(cfg)}
    if shards:
        write_index(out, shards, run_params, total)
    write_json_atomic(
        out / REPORT_NAME,
        {"input": cfg.input, "clips": len(plan), "samples": sum(s.samples for s in shards),
         "shards": len(shards), "failed": len(failures), "failures": failures,
         "frame_counts": total.to_json()["frame_counts"], "frame_gaps": frame_gaps,
         **({"ids": cfg.ids, "missing_ids": missing_ids} if cfg.ids else {})},
    )
    return RunResult(shards, failures, len(done), len(plan), out, notes, total, frame_gaps)
