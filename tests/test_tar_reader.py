"""The lean tar reader equals tarfile on every layout we may meet, and refuses broken tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from tgdp.data.tar_reader import iter_members

NAMES = ["k1.fbank.npy", "k1.frame_00.jpg", "a" * 150 + ".json", "dir/" + "b" * 120 + ".txt", "ü名.txt", "empty.bin"]


def make_tar(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(NAMES):
            payload = bytes(range(256)) * i + b"x" * (i * 37)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        folder = tarfile.TarInfo("a_dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return buf.getvalue()


def reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_matches_tarfile(fmt):
    data = make_tar(fmt)
    assert list(iter_members(io.BytesIO(data))) == reference(data)


def test_select_skips_members():
    data = make_tar(tarfile.PAX_FORMAT)
    got = [n for n, _ in iter_members(io.BytesIO(data), select=lambda n: n.endswith(".txt"))]
    assert got == [n for n in NAMES if n.endswith(".txt")]


def test_truncated_and_corrupt_tars_raise():
    data = make_tar(tarfile.PAX_FORMAT)
    with pytest.raises(tarfile.ReadError, match="truncated"):
        list(iter_members(io.BytesIO(data[: len(data) // 2 + 100])))
    corrupt = bytearray(data)
    corrupt[512 + 3] ^= 0xFF  # the name field of the second header: its checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(corrupt))))
    with pytest.raises(tarfile.ReadError):
        list(iter_members(io.BytesIO(b"not a tar file at all" * 40)))
