"""Test helper: writes small, format-compliant tgdp shards (and broken ones) without make_shards.

Samples are patterned so tests can check what the loader decoded:
  * fbank row r holds the value r in every mel bin (`fbank="rows"`; exact in float16 up to 2048),
    or standard-normal noise (`fbank="random"`);
  * frame k is a flat grey image of level `frame_level(k)`, so a decoded frame reveals its index.
Corruption is injected per global sample index (`corrupt={index: kind}`) or per shard.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from tgdp.data import format as shard_format

CORRUPTIONS = ("bad_jpeg", "fbank_shape", "fbank_nan", "missing_frame", "missing_fbank", "missing_json",
               "pickle_member")


def frame_level(k: int) -> int:
    """Grey level of frame k (16 frames -> 10..220, far enough apart to survive JPEG)."""
    return 10 + 14 * k


def jpeg(width: int, height: int, level: int | tuple[int, int, int], quality: int = 95,
         texture: np.random.Generator | None = None) -> bytes:
    """A flat image of `level`, or (texture=rng) smooth random content of realistic JPEG size."""
    if texture is not None:
        small = texture.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    else:
        image = Image.new("RGB", (width, height), (level,) * 3 if isinstance(level, int) else level)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_key(shard: int, i: int) -> str:
    return f"s{shard:03d}_{i:05d}"


def make_sample(key: str, *, rows: int, frame_wh: tuple[int, int], num_frames: int, labels: list[str],
                fbank: str, rng: np.random.Generator, corrupt: str | None = None,
                texture: bool = False, frame_times: list[float] | None = None,
                meta_update: dict | None = None) -> dict[str, bytes]:
    """One sample; `frame_times` as make_shards records them (None: as shards of older versions),
    `meta_update` overrides json fields (a value of None deletes the field)."""
    if fbank == "rows":
        arr = np.repeat(np.arange(rows, dtype=np.float32)[:, None], 128, axis=1)
    else:
        arr = rng.standard_normal((rows, 128)).astype(np.float32)
    if corrupt == "fbank_nan":
        arr[:] = np.nan
    sample: dict[str, bytes] = {"__key__": key}
    if corrupt == "fbank_shape":
        sample[shard_format.FBANK_EXT] = shard_format.encode_fbank(np.zeros((rows, 64), dtype=np.float32))
    else:
        sample[shard_format.FBANK_EXT] = shard_format.encode_fbank(arr)
    for k in range(num_frames):
        if corrupt == "bad_jpeg":
            sample[shard_format.frame_ext(k)] = b"\xff\xd8 this is not a jpeg"
        else:
            sample[shard_format.frame_ext(k)] = jpeg(*frame_wh, frame_level(k), texture=rng if texture else None)
    meta = shard_format.make_meta(key=key, video_id=key, labels=labels, source="factory", num_frames=num_frames,
                       fbank_frames=rows, has_audio=True, frame_times=frame_times)
    for field, value in (meta_update or {}).items():
        if value is None:
            meta.pop(field, None)
        else:
            meta[field] = value
    sample[shard_format.META_EXT] = json.dumps(meta).encode()
    if corrupt == "missing_frame":
        for k in range(num_frames):
            del sample[shard_format.frame_ext(k)]
    elif corrupt == "missing_fbank":
        del sample[shard_format.FBANK_EXT]
    elif corrupt == "missing_json":
        del sample[shard_format.META_EXT]
    elif corrupt == "pickle_member":  # a member that would need pickle: must be ignored, never loaded
        sample["pyd"] = b"\x80\x04crash\nthis\n."
    return sample


def make_shards(root: str | Path, *, num_shards: int = 4, samples_per_shard: int = 8, rows: int = 64,
                frame_wh: tuple[int, int] = (40, 32), num_frames: int = 16, fbank: str = "rows",
                labels: list[str] | None = None, corrupt: dict[int, str] | None = None,
                truncate: dict[int, float] | None = None, empty: set[int] | frozenset = frozenset(),
                missing: set[int] | frozenset = frozenset(), texture: bool = False, seed: int = 0, prefix: str = "shard") -> list[str]:
    """Write `num_shards` shards + index.json into `root`; returns the sample keys in write order.

    corrupt: global sample index -> one of CORRUPTIONS.
    truncate: shard -> fraction of its bytes kept (after the index is written: the count is stale).
    empty: shards replaced by 0-byte files after indexing; missing: shards deleted after indexing.
    texture: smooth random frame content (realistic JPEG sizes, for throughput measurements).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    corrupt = corrupt or {}
    keys, infos = [], []
    for s in range(num_shards):
        name = f"{prefix}-{s:06d}.tar"
        path = root / name
        with open(path, "wb") as fh:
            writer = wds.TarWriter(fh, mtime=0.0)
            for i in range(samples_per_shard):
                g = s * samples_per_shard + i
                key = sample_key(s, i)
                keys.append(key)
                sample_labels = labels if labels is not None else [f"/m/l{g % 3}"]
                writer.write(make_sample(key, rows=rows, frame_wh=frame_wh, num_frames=num_frames, labels=sample_labels,
                                         fbank=fbank, rng=rng, corrupt=corrupt.get(g), texture=texture))
            writer.close()
        infos.append(shard_format.ShardInfo(name, samples_per_shard, path.stat().st_size))
    shard_format.write_index(root, infos, {"factory": True})
    for s, fraction in (truncate or {}).items():
        path = root / infos[s].name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
    for s in empty:
        (root / infos[s].name).write_bytes(b"")
    for s in missing:
        os.remove(root / infos[s].name)
    return keys


def write_label_csv(path: str | Path, mids: list[str]) -> Path:
    path = Path(path)
    lines = ["index,mid,display_name"] + [f'{i},{m},"Name {i}"' for i, m in enumerate(mids)]
    path.write_text("\n".join(lines) + "\n")
    return path
