"""`python data_tools/make_shards.py --input MANIFEST --output DIR [options] [field=value ...]`."""

from __future__ import annotations

import fcntl
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from tgdp.config import parse_cli
from tgdp.data.format import INDEX_NAME, REPORT_NAME
from tgdp.data.shards.config import ShardingConfig
from tgdp.data.shards.parts import MergeError, merge_parts
from tgdp.data.shards.run import make_shards
from tgdp.data.shards.sources import ManifestError
from tgdp.data.shards.writer import ResumeMismatchError

FLAGS = {
    "--input": ("input", "CSV manifest (path,labels[,key]), a folder of videos, or a CAV-MAE JSON datafile"),
    "--output": ("output", "output folder for shards, index.json and report.json"),
    "--workers": ("workers", "parallel extraction processes (0 = one per core)"),
    "--prefix": ("prefix", "shard file prefix"),
    "--seed": ("seed", "seed of the clip-order shuffle"),
    "--ids": ("ids", "keep only the listed video ids (text file, CAV-MAE JSON or CSV): eval subsets"),
}


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_cli(
        ShardingConfig,
        "shards",
        argv,
        description="Convert raw videos (or CAV-MAE pre-extracted data) into tgdp WebDataset shards.",
        flags=FLAGS,
        default_preset="default",
        epilog="Re-running the same command resumes an interrupted run. Unusable inputs are listed in "
        f"<output>/{REPORT_NAME}; the exit code is non-zero only when no sample was produced.",
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = make_shards(cfg)
    except (ManifestError, ResumeMismatchError, FileNotFoundError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a lost mount: finished shards are durable, the open one was dropped
        print(f"make_shards: error: writing under {cfg.output} failed: {exc}. Finished shards are intact and "
              "recorded in the journal; fix the cause (e.g. free space) and re-run the same command to resume",
              file=sys.stderr)
        return 1
    reasons = Counter(f["reason"].split(" (")[0] for f in result.failures)
    print(f"{result.samples} samples in {len(result.shards)} shards under {result.output} "
          f"({result.total_clips} clips in, {len(result.failures)} unusable)")
    for reason, count in reasons.most_common():
        print(f"  {count:6d} x {reason}")
    if result.content.frame_counts:
        counts = sorted(result.content.frame_counts.items())
        print("frames per clip: " + ", ".join(f"{n} frames x {c}" for n, c in counts))
    if result.frame_gaps:
        print(f"{len(result.frame_gaps)} clips had gaps in their frame folders (kept with the frames they have): "
              f"{result.output / REPORT_NAME} `frame_gaps`")
    if result.failures:
        print(f"every unusable input and its reason: {result.output / REPORT_NAME}")
    if result.shards:
        print(f"index: {result.output / INDEX_NAME}")
    if cfg.num_tasks > 1:  # a part with no usable clip still counts as finished for the merge
        _merge_if_last(cfg)
        return 0
    if not result.shards:
        print("make_shards: error: no usable clip; nothing was written", file=sys.stderr)
        return 1
    return 0


def _merge_if_last(cfg: ShardingConfig) -> None:
    """The task that finishes last writes the merged index: each task tries after writing its own
    report, under a lock, so the one that sees every part finished is exactly the last one."""
    with open(Path(cfg.output) / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            merged = merge_parts(cfg.output, expect_tasks=cfg.num_tasks)
        except MergeError as exc:
            if not exc.pending:
                raise
            print(f"{len(exc.pending)} of {cfg.num_tasks} parts not finished yet; the task that finishes last "
                  "writes the merged index (or run data_tools/merge_shards.py)")
            return
    print(f"merged {merged.parts} parts: {merged.samples} samples in {len(merged.shards)} shards "
          f"-> {merged.output / INDEX_NAME}")


if __name__ == "__main__":
    sys.exit(main())
