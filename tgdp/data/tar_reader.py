"""A lean sequential tar reader for the training hot path.

Python's `tarfile` (which webdataset's iterator wraps) spends ~60 us of bookkeeping per member;
a training sample has 18 members, so reading dominated the loader's cost (~1 ms per sample vs
~0.6 ms for all decoding). Shards are plain POSIX tars read front to back, so this reader parses
the 512-byte headers itself: ustar names with prefix, GNU long names (`L`) and PAX `path` records,
checksums verified, and every truncation or corruption raised as `tarfile.ReadError`.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO, Callable, Iterator

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise tarfile.ReadError(f"bad {what} field {field!r}") from exc


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156], "checksum")
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise tarfile.ReadError(f"truncated tar: {what} needs {n} bytes, {len(data)} left")
    return data


def iter_members(fh: BinaryIO, select: Callable[[str], object] | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield `(name, data)` of the regular files in a tar stream; members `select` rejects are
    skipped without being read into memory when the stream can seek."""
    long_name: str | None = None
    seekable = fh.seekable()
    while True:
        header = fh.read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (a missing end marker after a whole member is tolerated)
        if len(header) != BLOCK:
            raise tarfile.ReadError(f"truncated tar: partial header of {len(header)} bytes")
        if not _checksum_ok(header):
            raise tarfile.ReadError("tar header checksum mismatch (corrupt or not a tar file)")
        size = _octal(header[124:136], "size")
        kind = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"L", b"x"):  # the NEXT member's long name (GNU) or PAX records
            payload = _read_exact(fh, padded, "extended header")[:size]
            long_name = payload.rstrip(b"\0").decode("utf-8", "replace") if kind == b"L" else _pax_path(payload)
            continue
        name = long_name
        long_name = None
        if name is None:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        if kind not in (b"0", b"\0", b"7") or (select is not None and not select(name)):
            if seekable:
                fh.seek(padded, 1)
            else:
                _read_exact(fh, padded, f"member {name}")
            continue
        data = _read_exact(fh, padded, f"member {name}")
        yield name, data[:size] if padded != size else data


def _pax_path(payload: bytes) -> str | None:
    """The `path` record of a PAX extended header ("<len> path=<value>\\n" records)."""
    pos = 0
    while pos < len(payload):
        space = payload.find(b" ", pos)
        if space < 0:
            break
        length = int(payload[pos:space])
        record = payload[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += length
    return None
