#!/usr/bin/env python
"""Write a synthetic audio-visual corpus (real h264+aac mp4 clips, manifest.csv, labels.csv).

    python data_tools/make_synthetic.py --output data/synthetic --num-clips 64 duration=5.0 workers=2

The manifest feeds make_shards.py directly. See tgdp/data/synthetic.py for what the clips contain.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

try:
    import tgdp  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tgdp.config import parse_cli
from tgdp.data.synthetic import SyntheticConfig, make_corpus


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(
        SyntheticConfig,
        "synthetic",
        argv,
        description=__doc__.split("\n")[0],
        default_preset="default",
        flags={
            "--output": ("output", "folder for clips/, manifest.csv and labels.csv"),
            "--num-clips": ("num_clips", "number of clips"),
            "--seed": ("seed", "random seed (same seed -> same corpus)"),
        },
    )
    start = time.perf_counter()
    manifest = make_corpus(
        cfg.output, num_clips=cfg.num_clips, num_classes=cfg.num_classes, duration=cfg.duration, fps=cfg.fps,
        width=cfg.width, height=cfg.height, sample_rate=cfg.sample_rate, seed=cfg.seed, workers=cfg.workers,
        progress=True,
    )
    elapsed = time.perf_counter() - start
    print(f"wrote {cfg.num_clips} clips in {elapsed:.1f} s ({elapsed / cfg.num_clips:.3f} s/clip); "
          f"manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
