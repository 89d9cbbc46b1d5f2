#!/usr/bin/env python
"""make_shards clips/s per core vs the official kind of preprocessing, measured in the same run.

Baseline (what CAV-MAE / TG-DP's scripts do per clip): `ffmpeg -vn -ar 16000` to a WAV, a second
pass keeping the first channel (their `sox remix 1`), and `ffmpeg` writing the 16 frames as JPEG
files (one select filter pass, short side 224). That leaves 17 loose files per clip and no fbank
yet; ours produces the finished shard sample (fbank included). Both run on ONE core.

    python bench/bench_make_shards.py [--clips 12] [--width 640 --height 360]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tgdp.data.shards.config import ShardingConfig  # noqa: E402
from tgdp.data.shards.run import make_shards  # noqa: E402
from tgdp.data.synthetic import make_corpus  # noqa: E402


def naive_clip(video: Path, out: Path) -> None:
    """The official kind: three ffmpeg processes and 17 files per clip."""
    out.mkdir(parents=True, exist_ok=True)
    q = ["ffmpeg", "-nostdin", "-loglevel", "error", "-threads", "1", "-y"]
    subprocess.run(q + ["-i", str(video), "-vn", "-ar", "16000", str(out / "full.wav")], check=True)
    subprocess.run(q + ["-i", str(out / "full.wav"), "-af", "pan=mono|c0=c0", str(out / "audio.wav")], check=True)
    fps, frames = 25.0, 250  # the synthetic corpus: 10 s at 25 fps
    idx = np.linspace(0, min(frames, 10 * fps) - 1, 16).astype(int)
    select = "+".join(f"eq(n\\,{i})" for i in idx)
    subprocess.run(q + ["-t", "10", "-i", str(video), "-vf", f"select='{select}',scale=-2:224",
                        "-fps_mode", "passthrough", "-q:v", "3", str(out / "frame_%02d.jpg")], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):  # one core for both (ffmpeg children inherit the mask)
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if shutil.which("ffmpeg") is None:
        sys.exit("bench_make_shards: the baseline needs the ffmpeg CLI (bash .ci/setup.sh installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_corpus(tmp / "corpus", num_clips=args.clips, duration=10.0, width=args.width,
                               height=args.height, seed=0)
        videos = sorted((tmp / "corpus").rglob("*.mp4"))
        t0 = time.perf_counter()
        for i, video in enumerate(videos):
            naive_clip(video, tmp / "naive" / str(i))
        naive = len(videos) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = make_shards(ShardingConfig(input=str(manifest), output=str(tmp / "shards"), workers=1,
                                            progress=False))
        ours = result.samples / (time.perf_counter() - t0)
        assert result.samples == len(videos), result.failures
    print(f"clips: {len(videos)} x 10 s, {args.width}x{args.height} h264+aac, one core each")
    print(f"naive ffmpeg subprocesses (16 JPEG + WAV files): {naive:7.2f} clips/s")
    print(f"make_shards (finished shard sample, fbank incl.): {ours:7.2f} clips/s")
    print(f"ratio make_shards / naive: {ours / naive:.2f}x")


if __name__ == "__main__":
    main()
