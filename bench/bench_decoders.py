#!/usr/bin/env python
"""Frame decoders for make_shards: PyAV (the baseline, tgdp's own path) vs decord, in the same run.

What make_shards needs from a decoder: the `frames.count` (16) frames on screen at the target times
of the first 10 s, as RGB resized to short side `frames.size` (224). Both decoders run on ONE core
(one process, affinity to one CPU, decord with num_threads=1); audio is left out of both (make_shards
would decode it with PyAV in either case, which costs decord an extra pass over the file).

- PyAV: `tgdp.data.shards.extract._demux` without an audio stream, i.e. exactly make_shards' path.
- decord: `VideoReader(width, height, num_threads=1)` (FFmpeg's scaler inside decord), the frame
  shown at each target time picked from `get_frame_timestamp`, `get_batch` of those indices.

Per file kind: clips/s of each, the ratio decord / PyAV, the largest and mean absolute pixel
difference between the two decoders' frames next to the JPEG round-trip error of the same PyAV
frames at quality 90 (the tolerance: make_shards stores JPEGs), and whether each decoder fails.
Failures are probed in a child process per file and decoder, so a crash (signal) is reported as
such instead of ending the benchmark.

    python bench/bench_decoders.py [--clips 8] [--width 640 --height 360] [--repeat 2]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tgdp.data.shards.config import ShardingConfig  # noqa: E402
from tgdp.data.shards.extract import _demux, _duration, _short_side_dims, target_times  # noqa: E402
from tgdp.data.synthetic import make_corpus, write_broken_inputs, write_odd_inputs, write_video  # noqa: E402

CFG = ShardingConfig()


def pyav_frames(path: str) -> list[np.ndarray]:
    with av.open(path, metadata_errors="ignore") as container:
        vstream = container.streams.video[0]
        fps = float(vstream.average_rate or vstream.guessed_rate or 0) or 30.0
        duration = _duration(container, vstream)
        times = target_times(duration if duration else CFG.clip_seconds, fps, CFG.frames.count, CFG.clip_seconds)
        frames, _, _, _ = _demux(container, vstream, None, times, CFG)
    if not frames:
        raise RuntimeError("no decodable video frames")
    return [np.asarray(f) for f in frames]


def decord_frames(path: str) -> list[np.ndarray]:
    import decord

    probe = decord.VideoReader(path, num_threads=1)
    h, w = probe[0].shape[:2] if len(probe) else (0, 0)
    del probe
    width, height = _short_side_dims(w, h, CFG.frames.size)
    vr = decord.VideoReader(path, width=width, height=height, num_threads=1)
    fps = vr.get_avg_fps() or 30.0
    starts = vr.get_frame_timestamp(range(len(vr)))[:, 0]
    starts = starts - starts[0]
    duration = len(vr) / fps if len(vr) else 0.0
    times = target_times(duration, fps, CFG.frames.count, CFG.clip_seconds)
    # the frame on screen at t: the last one starting at or before t
    idx = np.clip(np.searchsorted(starts, times + 0.5e-3, side="right") - 1, 0, len(vr) - 1)
    return list(vr.get_batch(idx.tolist()).asnumpy())


DECODERS = {"pyav": pyav_frames, "decord": decord_frames}


def jpeg_roundtrip(frame: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=CFG.frames.jpeg_quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def probe(decoder: str, path: Path) -> str:
    """'ok', 'error: ...' or 'CRASH (signal N)', from a child process."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_decoders as b; "
            f"f = b.DECODERS[{decoder!r}]({str(path)!r}); print(len(f), f[0].shape)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "HANG (killed after 30 s)"
    if proc.returncode < 0:
        return f"CRASH (signal {-proc.returncode})"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return "error: " + last[:90]
    return "ok"


def rate(fn, files: list[Path], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in files:
            fn(str(f))
        best = min(best, time.perf_counter() - t0)
    return len(files) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--repeat", type=int, default=2, help="timing passes per kind, best one kept")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import decord

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_corpus(tmp / "corpus", num_clips=args.clips, duration=10.0, width=args.width, height=args.height,
                    seed=0, workers=1)
        kinds: dict[str, list[Path]] = {f"corpus {args.width}x{args.height} 10 s": sorted((tmp / "corpus").rglob("*.mp4"))}
        kinds["fps60_portrait 360x640 10 s"] = [write_video(tmp / "p60.mp4", duration=10.0, fps=60.0, width=360,
                                                            height=640)]
        kinds.update({name: [path] for name, path in write_odd_inputs(tmp / "odd").items()})
        broken = write_broken_inputs(tmp / "broken")
        kinds.update({name: [path] for name, path in broken.items() if name not in ("audio_only",)})

        rows = []
        for kind, files in kinds.items():
            status = {d: probe(d, files[0]) for d in DECODERS}
            print(f"# {kind}: {status}", file=sys.stderr, flush=True)
            row = {"kind": kind, **{f"{d}_status": s for d, s in status.items()}}
            if all(s == "ok" for s in status.values()):
                row["pyav"] = rate(pyav_frames, files, args.repeat)
                row["decord"] = rate(decord_frames, files, args.repeat)
                diffs, means, jpeg = [], [], []
                for f in files:
                    a, b = pyav_frames(str(f)), decord_frames(str(f))
                    if len(a) != len(b) or a[0].shape != b[0].shape:
                        diffs.append(float("nan"))
                        continue
                    d = np.abs(np.stack(a).astype(int) - np.stack(b).astype(int))
                    diffs.append(d.max())
                    means.append(d.mean())
                    jpeg.append(max(np.abs(jpeg_roundtrip(x).astype(int) - x.astype(int)).max() for x in a))
                row.update(maxdiff=max(diffs), meandiff=float(np.mean(means)) if means else float("nan"),
                           jpeg=max(jpeg) if jpeg else float("nan"))
            rows.append(row)

    print(f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}), decord {decord.__version__}; one core, "
          f"{CFG.frames.count} frames at short side {CFG.frames.size}")
    print("| file kind | PyAV clips/s | decord clips/s | decord / PyAV | max (mean) pixel diff | JPEG q90 max diff "
          "| PyAV | decord |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "pyav" in r:
            print(f"| {r['kind']} | {r['pyav']:.1f} | {r['decord']:.1f} | {r['decord'] / r['pyav']:.2f}x | "
                  f"{r['maxdiff']:.0f} ({r['meandiff']:.2f}) | {r['jpeg']:.0f} | {r['pyav_status']} | {r['decord_status']} |")
        else:
            print(f"| {r['kind']} | - | - | - | - | - | {r['pyav_status']} | {r['decord_status']} |")
    timed = [r for r in rows if "pyav" in r]
    if timed:
        geo = float(np.exp(np.mean([np.log(r["decord"] / r["pyav"]) for r in timed])))
        print(f"ratio decord / PyAV, geometric mean over {len(timed)} kinds both decode: {geo:.2f}x")


if __name__ == "__main__":
    main()
