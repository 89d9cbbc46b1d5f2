"""Test helper: real shards in every tar layout tgdp may meet, and seeded ways to damage them
(bit flips, byte runs, truncations, header-field garbage, broken PAX records and GNU long names).
Used by tests/test_tar_reader.py (the reader against Python's `tarfile`) and
tests/test_faults_data.py (a training run over the whole damaged set)."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np

from tests.shard_factory import make_sample
from tgdp.data import format as shard_format

BLOCK = 512
SAMPLES_PER_SHARD = 2
NUM_FRAMES = 2
# (start, end) of every ustar header field
FIELDS = {"name": (0, 100), "mode": (100, 108), "uid": (108, 116), "gid": (116, 124), "size": (124, 136),
          "mtime": (136, 148), "checksum": (148, 156), "type": (156, 157), "linkname": (157, 257),
          "magic": (257, 263), "version": (263, 265), "uname": (265, 297), "gname": (297, 329),
          "devmajor": (329, 337), "devminor": (337, 345), "prefix": (345, 500)}
NUMBER_FIELDS = ("mode", "uid", "gid", "size", "mtime", "checksum", "devmajor", "devminor")
# How many of each kind of damage `damaged_shards` makes, in this order (bases taken in turn)
KINDS = {"bit_flip": 110, "byte_run": 100, "truncate": 70, "header_field": 150, "pax_record": 60, "gnu_long": 40}


def pad(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % BLOCK)


def raw_member(name: str, payload: bytes, kind: bytes = b"0") -> bytes:
    """One member written by hand: a ustar header of type `kind` and its padded payload."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = len(payload), kind, 0
    return info.tobuf(tarfile.USTAR_FORMAT) + pad(payload)


def pax_record(key: bytes, value: bytes) -> bytes:
    """A well-framed PAX record: `"<length> <key>=<value>\\n"`, the length counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


def fix_checksum(header: bytearray) -> None:
    """Make a (damaged) header's checksum right again, so the damage reaches the fields behind it."""
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)  # at most 512 x 255 < 8 ** 6


def base_shards(seed: int = 0) -> dict[str, bytes]:
    """Small shards of real samples (2 samples, 2 frames) in four layouts: `pax` (webdataset's
    writer: a PAX header with mtime before every member), `ustar` (make_shards' layout, no
    extended headers), `gnu_long` (GNU format, names over 100 characters: `L` headers) and
    `pax_long` (PAX format, long names and a comment: `path` and `comment` records)."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    shards = {}
    for layout in ("pax", "ustar", "gnu_long", "pax_long"):
        samples = []
        for i in range(SAMPLES_PER_SHARD):
            key = f"{layout}_{i:03d}" + ("_" + "k" * 110 if layout.endswith("_long") else "")
            samples.append(make_sample(key, rows=16, frame_wh=(16, 16), num_frames=NUM_FRAMES, labels=["/m/a"],
                                       fbank="random", rng=rng))
        buf = io.BytesIO()
        if layout == "pax":
            writer = wds.TarWriter(buf, mtime=0.0)
            for sample in samples:
                writer.write(sample)
            writer.close()
        else:
            formats = {"ustar": tarfile.USTAR_FORMAT, "gnu_long": tarfile.GNU_FORMAT, "pax_long": tarfile.PAX_FORMAT}
            with tarfile.open(fileobj=buf, mode="w", format=formats[layout]) as tar:
                for sample in samples:
                    for ext, data in sample.items():
                        if ext == "__key__":
                            continue
                        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        if layout == "pax_long":
                            info.pax_headers = {"comment": "tgdp fuzz " + "c" * 20}
                        tar.addfile(info, io.BytesIO(data))
        shards[layout] = buf.getvalue()
    return shards


def headers(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, size) of every header block of an intact tar."""
    out, at = [], 0
    while at + BLOCK <= len(data) and data[at:at + BLOCK] != bytes(BLOCK):
        size = tarfile.nti(data[at + 124:at + 136])
        out.append((at, data[at + 156:at + 157], size))
        at += BLOCK + len(pad(bytes(size)))
    return out


def _fit(value: bytes, width: int) -> bytes:
    return value[:width].ljust(width, b"\0")


def _number_garbage(rng: random.Random, width: int, true: int) -> bytes:
    options = [
        b"%o" % rng.randrange(8 ** (width - 1)), b"%o" % max(0, true + rng.choice([-513, -1, 1, 511, 512, 4096])),
        b"9" * (width - 1), b"-%o" % rng.randrange(1, 4096), b"+17", b" 1 2", b"1_0", b"0x10", "٣".encode(),
        b"\xff" + bytes(rng.randrange(256) for _ in range(width - 1)),
        b"\x80" + bytes(rng.randrange(256) for _ in range(width - 1)),
        bytes([rng.randrange(0x81, 0xFF)]) + b"17", b"", b" " * width, b"%o" % (8 ** width),
        bytes(rng.randrange(256) for _ in range(width)),
    ]
    return _fit(rng.choice(options), width)


def _text_garbage(rng: random.Random, width: int) -> bytes:
    options = [bytes(rng.randrange(256) for _ in range(width)), b"\xff\xfe\x00bad", b"a/b/c.frame_00.jpg",
               b"../../etc/passwd", b"x" * width, b"", b"dir/", "ключ.json".encode(), b".json", b"k1.fbank.npy"]
    return _fit(rng.choice(options), width)


def _header_field(data: bytes, rng: random.Random) -> bytes:
    at, _, size = rng.choice(headers(data))
    field = rng.choice(list(FIELDS))
    start, end = at + FIELDS[field][0], at + FIELDS[field][1]
    out = bytearray(data)
    if field == "type":
        out[start] = rng.choice(list(b"0\x0012345677LKSxXgVAZ") + [rng.randrange(256)])
    elif field in NUMBER_FIELDS:
        out[start:end] = _number_garbage(rng, end - start, size if field == "size" else 0)
    else:
        out[start:end] = _text_garbage(rng, end - start)
    if field != "checksum" and rng.random() < 0.75:
        header = bytearray(out[at:at + BLOCK])
        fix_checksum(header)
        out[at:at + BLOCK] = header
    return bytes(out)


def _replace_extended(data: bytes, at: int, size: int, payload: bytes, size_field: bytes | None = None) -> bytes:
    """The tar with the extended header at `at` carrying `payload` (its size field set to match,
    or to `size_field`), the rest of the archive moved along."""
    header = bytearray(data[at:at + BLOCK])
    header[124:136] = size_field if size_field is not None else b"%011o\0" % len(payload)
    fix_checksum(header)
    return data[:at] + bytes(header) + pad(payload) + data[at + BLOCK + len(pad(bytes(size))):]


def _pax_record(data: bytes, rng: random.Random) -> bytes:
    found = [(at, size) for at, kind, size in headers(data) if kind == b"x"]
    if not found:
        return _header_field(data, rng)
    at, size = rng.choice(found)
    payload = data[at + BLOCK:at + BLOCK + size]
    first, _, rest = payload.partition(b"\n")
    length, _, record = first.partition(b" ")
    how = rng.randrange(8)
    if how == 0:  # the length digits: 0, 00, negative, huge, non-numeric, too long, too short, missing
        length = rng.choice([b"0", b"00", b"-5", b"9" * 25, b"99999999999", b"ab", b"%d" % (len(first) + 1 + 100),
                             b"%d" % (len(first) - 3), b"1", b""])
        payload = length + b" " + record + b"\n" + rest
    elif how == 1:  # no "=" or no newline
        payload = (first.replace(b"=", b":", 1) + b"\n" + rest) if rng.random() < 0.5 else first + b" " + rest
    else:  # an extra record, well framed: a path, a size, sparse markers, a charset, an empty key
        key, value = rng.choice([(b"path", b"evil/" + b"p" * rng.randrange(0, 200) + b".json"),
                                 (b"path", b"\xff\xfe.frame_00.jpg"), (b"size", rng.choice([b"-1", b"abc", b"0", b"7",
                                                                                             b"99999999", b" 12 "])),
                                 (b"GNU.sparse.size", b"5"), (b"GNU.sparse.realsize", b"x"), (b"hdrcharset", b"BINARY"),
                                 (b"", b"nokey"), (b"mtime", b"nan"), (b"comment", b"\x00" * 3)])
        payload = payload + pax_record(key, value)
    size_field = None if rng.random() < 0.8 else _number_garbage(rng, 12, len(payload))
    return _replace_extended(data, at, size, payload, size_field)


def _gnu_long(data: bytes, rng: random.Random) -> bytes:
    found = [(at, size) for at, kind, size in headers(data) if kind == b"L"]
    if not found:
        return _pax_record(data, rng)
    at, size = rng.choice(found)
    payload = rng.choice([bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 700))), b"", b"a/" * 300,
                          b"no_terminator.json", b"k\x00hidden.json\x00", data[at + BLOCK:at + BLOCK + size] * 3])
    size_field = None if rng.random() < 0.6 else _number_garbage(rng, 12, len(payload))
    return _replace_extended(data, at, size, payload, size_field)


def _bit_flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    spots = headers(data)
    for _ in range(rng.randrange(1, 9)):
        at = rng.choice(spots)[0] + rng.randrange(BLOCK) if rng.random() < 0.5 else rng.randrange(len(out))
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


def _byte_run(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    length = rng.randrange(1, 17) if rng.random() < 0.7 else rng.randrange(17, 1100)
    at = rng.choice(headers(data))[0] + rng.randrange(BLOCK) if rng.random() < 0.5 else rng.randrange(len(out))
    fill = rng.choice([None, 0x00, 0xFF, 0x30, 0x20])
    run = bytes(rng.randrange(256) for _ in range(length)) if fill is None else bytes([fill]) * length
    out[at:at + length] = run[:len(out) - at]
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return data[:rng.randrange(len(data))]
    return data[:max(0, rng.choice(headers(data))[0] + rng.randrange(-3, BLOCK + 4))]


_DAMAGE = {"bit_flip": _bit_flip, "byte_run": _byte_run, "truncate": _truncate, "header_field": _header_field,
           "pax_record": _pax_record, "gnu_long": _gnu_long}


def damaged_shards(seed: int) -> list[tuple[str, bytes]]:
    """`sum(KINDS.values())` damaged copies of `base_shards()`, as (label, bytes); the label names
    the layout, the kind of damage and its number. The same seed gives the same bytes."""
    rng = random.Random(seed)
    bases = base_shards(seed)
    layouts = sorted(bases)
    out = []
    for kind, count in KINDS.items():
        for i in range(count):
            layout = layouts[i % len(layouts)]
            out.append((f"{layout}-{kind}-{i:03d}", _DAMAGE[kind](bases[layout], rng)))
    return out


def write_shard_set(root: Path, shards: list[tuple[str, bytes]]) -> list[Path]:
    """Write the shards (named after their labels) with an index.json that gives each its
    intact sample count, as make_shards would have."""
    root.mkdir(parents=True, exist_ok=True)
    paths, infos = [], []
    for label, data in shards:
        path = root / f"{label}.tar"
        path.write_bytes(data)
        paths.append(path)
        infos.append(shard_format.ShardInfo(path.name, SAMPLES_PER_SHARD, len(data)))
    shard_format.write_index(root, infos, {"fuzzed": True})
    return paths
