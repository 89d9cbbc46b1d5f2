"""`python data_tools/make_shards.py --input MANIFEST --output DIR [options] [field=value ...]`."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from typing import Sequence

from tgdp.config import parse_cli
from tgdp.data.format import INDEX_NAME, REPORT_NAME
from tgdp.data.shards.config import ShardingConfig
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
    reasons = Counter(f["reason"].split(" (")[0] for f in result.failures)
    print(f"{result.samples} samples in {len(result.shards)} shards under {result.output} "
          f"({result.total_clips} clips in, {len(result.failures)} unusable)")
    for reason, count in reasons.most_common():
        print(f"  {count:6d} x {reason}")
    if result.failures:
        print(f"every unusable input and its reason: {result.output / REPORT_NAME}")
    if not result.shards:
        print("make_shards: error: no usable clip; nothing was written", file=sys.stderr)
        return 1
    print(f"index: {result.output / INDEX_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
