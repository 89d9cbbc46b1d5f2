"""Test helper: a dataset laid out exactly as CAV-MAE's preprocessing scripts leave it.

From real video files (the synthetic corpus), per clip:
  * audio: `ffmpeg -i VIDEO -vn -ar 16000 -ac 1 <audio>/<id>.wav` (CAV-MAE's extract_audio.py
    resamples with ffmpeg and keeps the first channel with sox; the corpus clips are mono);
  * frames: CAV-MAE's extract_video_frame.py - N frames at frame index int(i * F / N), F = min(frame
    count, 10 * fps), reading the frame before that index (OpenCV's seek to index - 1), resized
    (short side 224, bilinear) and centre-cropped to 224 x 224, saved as
    `<frames>/frame_<i>/<id>.jpg` (torchvision's save_image: JPEG at PIL's default quality);
  * the JSON datafile: {"data": [{"video_id", "wav", "video_path": <frames>, "labels": "m1,m2"}]}.
Frame decoding uses PyAV (same FFmpeg decoder as OpenCV's backend).
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import av
from PIL import Image


def extract_audio(video: Path, wav: Path) -> Path:
    wav.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-vn", "-ar", "16000",
                    "-ac", "1", str(wav)], check=True)
    return wav


def extract_frames(video: Path, frames_root: Path, video_id: str, count: int, size: int = 224) -> list[float]:
    """CAV-MAE's extract_frame(); returns the times (s) of the frames written."""
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        decoded = [(float(f.pts * f.time_base), f.to_image()) for f in container.decode(stream)]
    total = min(len(decoded), int(fps * 10))
    times = []
    for i in range(count):
        t, image = decoded[max(0, int(i * (total / count)) - 1)]
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        out = frames_root / f"frame_{i}" / f"{video_id}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        image.crop((left, top, left + size, top + size)).save(out, format="JPEG")
        times.append(t)
    return times


def write_cavmae_dataset(corpus_manifest: Path, root: Path, frames: dict[str, int] | int = 10,
                         limit: int | None = None, raw_video_path: bool = False) -> Path:
    """CAV-MAE layout of the first `limit` corpus clips under `root` (audio/, frames/, data.json);
    `frames` is the frame count of every clip or {video id: count}; `raw_video_path` adds the video
    file to each entry, as TG-DP's lists do. Returns the datafile."""
    with open(corpus_manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))[:limit]
    entries = []
    for row in rows:
        vid, video = row["key"], corpus_manifest.parent / row["path"]
        count = frames if isinstance(frames, int) else frames[vid]
        wav = extract_audio(video, root / "audio" / f"{vid}.wav")
        extract_frames(video, root / "frames", vid, count)
        entries.append({"video_id": vid, "wav": str(wav), "video_path": str(root / "frames"),
                        "labels": row["labels"], **({"raw_video_path": str(video)} if raw_video_path else {})})
    datafile = root / "data.json"
    datafile.write_text(json.dumps({"data": entries}, indent=1))
    return datafile


def write_class_labels_indices(path: Path, mids: list[str]) -> Path:
    """A label file as CAV-MAE ships it (class_labels_indices.csv): quoted display names, some with commas."""
    lines = ["index,mid,display_name"] + [f'{i},{mid},"Name {i}, with a comma"' for i, mid in enumerate(mids)]
    path.write_text("\n".join(lines) + "\n")
    return path
