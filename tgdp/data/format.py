"""The tgdp shard format: one home for member names, the safe fbank codec and the shard index.

A sample is a group of tar members sharing a key (WebDataset convention `<key>.<ext>`):

    <key>.fbank.npy      float16 [frames, 128] un-normalised Kaldi log-mel (NumPy .npy, no pickle)
    <key>.frame_00.jpg   N JPEG frames (16 from video files; what a pre-extracted clip holds, up to
    ...                  100), short side `frame_size` px (default 224), aspect kept
    <key>.frame_<N-1>.jpg
    <key>.json           labels and metadata (see `make_meta`)

Plain `webdataset` reads it without tgdp (`wds.WebDataset(url).decode("rgb")`). See docs/data.md.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = "tgdp-shards/1"
FBANK_EXT = "fbank.npy"
META_EXT = "json"
INDEX_NAME = "index.json"
SIZES_NAME = "sizes.json"  # open_clip / webdataset convention: {shard file name: sample count}
REPORT_NAME = "report.json"
NUM_FRAMES = 16


def frame_ext(k: int) -> str:
    """Member extension of frame `k`: two digits, as the TG-DP packer numbers its frames."""
    return f"frame_{k:02d}.jpg"


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def sanitise_key(raw: str) -> str:
    """A WebDataset-safe key: WebDataset splits a member name at the FIRST dot of its basename and
    treats `/` as a directory, so keys keep only letters, digits, `_` and `-` (the original id
    stays in the sample's json)."""
    key = _UNSAFE_KEY_CHARS.sub("_", raw.strip())
    return key or "_"


class SampleFormatError(ValueError):
    """A shard member that does not follow the tgdp format (reported with its shard and key)."""


def encode_fbank(fbank: np.ndarray) -> bytes:
    """Serialise an fbank `[frames, 128]` as float16 .npy bytes (never pickled)."""
    arr = np.ascontiguousarray(fbank, dtype=np.float16)
    if arr.ndim != 2:
        raise SampleFormatError(f"fbank must be 2-D [frames, mel], got shape {arr.shape}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class NpyView:
    """A parsed .npy header: enough to slice rows straight out of the bytes without a full copy."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int


def parse_npy_header(data: bytes) -> NpyView:
    """Parse a .npy header; refuse object arrays (which would need pickle) and Fortran order."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise SampleFormatError(f"not a .npy array: {exc}") from exc
    if dtype.hasobject:
        raise SampleFormatError("object arrays need pickle and are refused")
    if fortran:
        raise SampleFormatError("Fortran-ordered arrays are not written by tgdp")
    return NpyView(tuple(shape), dtype, stream.tell())


# Exponent bits of IEEE half / single floats: all ones means inf or NaN.
_NONFINITE_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def decode_fbank(data: bytes, start: int = 0, end: int | None = None, num_mel_bins: int = 128) -> np.ndarray:
    """Rows `[start, end)` (clipped to what exists) of a stored fbank as float32, validated.

    Converts only the requested rows; raises `SampleFormatError` for a wrong dtype, shape,
    truncated payload or a NaN/inf ANYWHERE in the stored fbank (a bit test over the whole
    payload, ~10 us at 998 rows), so a corrupt sample is skipped and logged whichever window of
    it is drawn, not only when the window happens to cover the bad rows.
    """
    view = parse_npy_header(data)
    if len(view.shape) != 2 or view.shape[1] != num_mel_bins:
        raise SampleFormatError(f"fbank shape {view.shape}, expected [frames, {num_mel_bins}]")
    if view.dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise SampleFormatError(f"fbank dtype {view.dtype}, expected float16")
    rows = view.shape[0]
    expected = view.offset + rows * num_mel_bins * view.dtype.itemsize
    if len(data) < expected:
        raise SampleFormatError(f"fbank payload truncated ({len(data)} of {expected} bytes)")
    bits, exponent = _NONFINITE_BITS[view.dtype]
    if ((np.frombuffer(data, dtype=bits, count=rows * num_mel_bins, offset=view.offset) & exponent) == exponent).any():
        raise SampleFormatError("fbank holds NaN or inf")
    end = rows if end is None else min(end, rows)
    start = min(max(start, 0), end)
    row_bytes = num_mel_bins * view.dtype.itemsize
    arr = np.frombuffer(
        data, dtype=view.dtype, count=(end - start) * num_mel_bins, offset=view.offset + start * row_bytes
    ).reshape(end - start, num_mel_bins)
    return arr.astype(np.float32)


def fbank_num_rows(data: bytes) -> int:
    """Number of stored fbank frames, from the header alone."""
    return parse_npy_header(data).shape[0]


def make_meta(
    *,
    key: str,
    video_id: str,
    labels: list[str],
    source: str,
    num_frames: int,
    fbank_frames: int,
    has_audio: bool,
    duration: float | None = None,
    fps: float | None = None,
    width: int | None = None,
    height: int | None = None,
    sample_rate: int | None = None,
    channels: int | None = None,
    frame_times: list[float] | None = None,
    missing_frames: list[int] | None = None,
) -> dict[str, Any]:
    """The per-sample json: labels plus what a user needs to trace a sample to its source.
    `frame_times` (s) place the `num_frames` frames in the clip; `missing_frames` (only when
    non-empty) lists the slots k of a pre-extracted clip that had no frame file."""
    meta = {
        "key": key,
        "video_id": video_id,
        "labels": list(labels),
        "source": source,
        "num_frames": num_frames,
        "fbank_frames": fbank_frames,
        "has_audio": has_audio,
        "duration": duration,
        "fps": fps,
        "width": width,
        "height": height,
        "sample_rate": sample_rate,
        "channels": channels,
        "frame_times": frame_times,
    }
    if missing_frames:
        meta["missing_frames"] = list(missing_frames)
    return meta


# ----------------------------------------------------------------------------- shard index


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard as the index records it."""

    name: str
    samples: int
    bytes: int


@dataclass
class ContentSummary:
    """What a shard set holds, for its index: clips per frame count and per label."""

    frame_counts: dict[int, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)

    def add(self, meta: dict[str, Any]) -> None:
        """Count one sample from its json."""
        n = int(meta.get("num_frames", NUM_FRAMES))
        self.frame_counts[n] = self.frame_counts.get(n, 0) + 1
        for label in meta.get("labels", []):
            self.label_counts[label] = self.label_counts.get(label, 0) + 1

    def merge(self, other: "ContentSummary") -> None:
        for n, c in other.frame_counts.items():
            self.frame_counts[n] = self.frame_counts.get(n, 0) + c
        for label, c in other.label_counts.items():
            self.label_counts[label] = self.label_counts.get(label, 0) + c

    def to_json(self) -> dict[str, Any]:
        return {"frame_counts": {str(n): self.frame_counts[n] for n in sorted(self.frame_counts)},
                "label_counts": dict(sorted(self.label_counts.items()))}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> "ContentSummary":
        return cls({int(n): int(c) for n, c in payload.get("frame_counts", {}).items()},
                   {str(k): int(c) for k, c in payload.get("label_counts", {}).items()})


@dataclass(frozen=True)
class ShardIndex:
    """The index beside a shard set: per-shard sample counts and the parameters of the run.
    `content` (clips per frame count and per label) is None for indexes that do not record it."""

    root: Path
    shards: tuple[ShardInfo, ...]
    params: dict[str, Any]
    content: ContentSummary | None = None

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def urls(self) -> list[str]:
        return [str(self.root / s.name) for s in self.shards]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to `path` through a temporary file and an atomic rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (full disk) leaves the previous file and no stray temporary
        tmp.unlink(missing_ok=True)


def write_index(root: Path, shards: list[ShardInfo], params: dict[str, Any],
                content: ContentSummary | None = None) -> None:
    """Write `index.json` (with `frame_counts` / `label_counts` when `content` is known) and the
    open_clip-style `sizes.json` beside the shards."""
    root = Path(root)
    write_json_atomic(
        root / INDEX_NAME,
        {
            "format": FORMAT_VERSION,
            "total_samples": sum(s.samples for s in shards),
            "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in shards],
            **(content.to_json() if content is not None else {}),
            "params": params,
        },
    )
    write_json_atomic(root / SIZES_NAME, {s.name: s.samples for s in shards})


def read_index(path: str | Path) -> ShardIndex:
    """Read a shard index (a folder holding `index.json`, or the file itself), validated."""
    path = Path(path)
    file = path / INDEX_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no shard index at {file}: pass the folder written by data_tools/make_shards.py "
            f"(it holds {INDEX_NAME} beside the .tar shards)"
        )
    with open(file, encoding="utf-8") as fh:
        payload = json.load(fh)
    if payload.get("format") != FORMAT_VERSION:
        raise SampleFormatError(f"{file}: format {payload.get('format')!r}, expected {FORMAT_VERSION!r}")
    try:
        shards = tuple(ShardInfo(str(s["name"]), int(s["samples"]), int(s["bytes"])) for s in payload["shards"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SampleFormatError(f"{file}: malformed shard entry ({exc})") from exc
    try:
        content = ContentSummary.from_json(payload) if "frame_counts" in payload else None
    except (AttributeError, TypeError, ValueError) as exc:
        raise SampleFormatError(f"{file}: malformed frame_counts / label_counts ({exc})") from exc
    return ShardIndex(root=file.parent, shards=shards, params=dict(payload.get("params", {})), content=content)
