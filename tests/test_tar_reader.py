"""The lean tar reader equals tarfile on every layout we may meet, and ends every damaged tar in
bounded time with a read error (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import io
import signal
import tarfile

import pytest

from tests.tar_fuzz import FIELDS, base_shards, damaged_shards, fix_checksum, pad, pax_record, raw_member
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


# ----------------------------------------------------------------------------- damaged tars

FUZZ_SEED = 16
READ_BOUND_S = 10.0  # every read of a ~30 KB shard must end within this (it takes milliseconds)


class Overdue(Exception):
    """A read that did not end within its bound."""


@contextlib.contextmanager
def time_bound(seconds: float):
    def expire(signum, frame):
        raise Overdue(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Unseekable(io.RawIOBase):
    """A pipe-like stream: no seek, reads return what is there."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self._data.readinto(buf)


def read_ours(data: bytes, seekable: bool = True) -> tuple[list[tuple[str, bytes]], tarfile.ReadError | None]:
    """The members our reader yields and the read error it stops with (None: it read to the end).
    Anything else it raises, or a read past the bound, fails the test."""
    members: list[tuple[str, bytes]] = []
    stream = io.BytesIO(data) if seekable else io.BufferedReader(Unseekable(data))
    try:
        with time_bound(READ_BOUND_S):
            for member in iter_members(stream):
                members.append(member)
    except tarfile.ReadError as exc:
        return members, exc
    return members, None


def read_tarfile(data: bytes) -> list[tuple[str, bytes]] | None:
    """Python's tarfile's regular members and their data, or None where tarfile does not read the
    file: it raises, runs past the bound, goes backwards (a negative size: it may never end) or
    meets a sparse member."""
    try:
        with time_bound(READ_BOUND_S), tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8") as tar:
            members, last = [], -1
            for n, m in enumerate(tar):
                backwards = m.offset <= last or n > len(data) // 512
                if backwards or m.issparse() or (m.size < 0 and (m.isreg() or m.type not in tarfile.SUPPORTED_TYPES)):
                    return None
                last = m.offset
                if m.isfile():
                    members.append((m.name, tar.extractfile(m).read()))
            return members
    except Exception:  # noqa: BLE001 - any failure (or Overdue) means tarfile did not read it
        return None


def _tarfile_skips_malformed_pax_records() -> bool:
    """CPython < 3.12.6 ignores the rest of a PAX header after a record it cannot parse (and reads
    on); later versions (and tgdp's reader) refuse the header."""
    data = (raw_member("a.json", b"{}") + raw_member("pax", b"6 x=1\ngarbage", b"x") + raw_member("b.json", b"{}")
            + bytes(1024))
    return len(read_tarfile(data) or []) == 2


def with_pax(payload: bytes) -> bytes:
    return raw_member("a.json", b"{}") + raw_member("pax", payload, b"x") + raw_member("b.json", b"{}") + bytes(1024)


def with_header_field(field: str, value: bytes, fix: bool = True) -> bytes:
    header = bytearray(raw_member("b.json", b"{}")[:512])
    start, end = FIELDS[field]
    header[start:end] = value.ljust(end - start, b"\0")
    if fix:
        fix_checksum(header)
    return raw_member("a.json", b"{}") + bytes(header) + pad(b"{}") + bytes(1024)


DAMAGE = {
    # PAX records: the "00 comment=..." and every other way a length can be wrong
    "pax_length_00": (with_pax(b"00 comment=tgdp fuzz\n"), "malformed PAX record"),
    "pax_length_0": (with_pax(b"0 comment=x\n"), "malformed PAX record"),
    "pax_length_negative": (with_pax(b"-12 comment=x\n"), "malformed PAX record"),
    "pax_length_huge": (with_pax(b"99999999999999999999 comment=x\n"), "malformed PAX record"),
    "pax_length_too_many_digits": (with_pax(b"1" * 25 + b" comment=x\n"), "malformed PAX record"),
    "pax_length_non_numeric": (with_pax(b"ab comment=x\n"), "malformed PAX record"),
    "pax_length_past_the_payload": (with_pax(b"200 comment=x\n"), "malformed PAX record"),
    "pax_length_short": (with_pax(b"4 comment=x\n"), "malformed PAX record"),
    "pax_no_newline": (with_pax(b"13 comment=xy "), "malformed PAX record"),
    "pax_no_equals": (with_pax(b"12 comment:x\n"), "malformed PAX record"),
    "pax_size_negative": (with_pax(pax_record(b"size", b"-1")), "negative size"),
    "pax_sparse": (with_pax(pax_record(b"GNU.sparse.size", b"5")), "sparse"),
    # GNU long names
    "gnu_long_name_past_the_end": (raw_member("a.json", b"{}") + raw_member("././@LongLink", b"x" * 10, b"L")[:600],
                                   "truncated"),
    "gnu_long_name_then_end": (raw_member("a.json", b"{}") + raw_member("././@LongLink", b"k.json\0", b"L")
                               + bytes(1024), "not followed by a member"),
    # size and checksum fields
    "size_negative": (with_header_field("size", b"\xff" + b"\xff" * 11), "negative size"),
    "size_huge": (with_header_field("size", b"\x80" + (8 << 30).to_bytes(11, "big")), "truncated"),
    "size_non_numeric": (with_header_field("size", b"12a4"), "the size field"),
    "size_with_minus": (with_header_field("size", b"-17"), "negative size"),
    "mtime_non_numeric": (with_header_field("mtime", b"yesterday"), "the mtime field"),
    "checksum_wrong": (with_header_field("checksum", b"0000001\0", fix=False), "checksum mismatch"),
    "checksum_non_numeric": (with_header_field("checksum", b"sum\0", fix=False), "the checksum field"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_each_kind_of_header_damage_is_a_read_error_after_the_members_before_it(case):
    data, reason = DAMAGE[case]
    members, error = read_ours(data)
    assert members == [("a.json", b"{}")] and error is not None and reason in str(error), (members, error)
    assert "tar header at byte" in str(error)  # where the damage is


def test_gnu_long_name_and_signed_checksum_read_as_tarfile_reads_them():
    long_name = raw_member("././@LongLink", b"k" * 120 + b".json\0hidden", b"L")  # cut at the NUL, as tarfile does
    header = bytearray(raw_member("placeholder", b"{}")[:512])
    header[0:100] = b"\xe9t\xe9.json".ljust(100, b"\0")  # high bytes, not UTF-8: Sun / NeXT tars sum them signed
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in header)
    header[148:155] = b"%06o\0" % signed
    data = long_name + raw_member("short.json", b"[1]") + bytes(header) + pad(b"{}") + bytes(1024)
    members, error = read_ours(data)
    assert error is None and members == read_tarfile(data)
    assert [m[0] for m in members] == ["k" * 120 + ".json", "\udce9t\udce9.json"]


def test_damaged_shards_end_in_bounded_time_with_tarfiles_members_or_a_read_error():
    """530 seeded ways to damage real shards in 4 layouts (bit flips, byte runs, truncations,
    header-field garbage with and without a repaired checksum, broken PAX records, broken GNU long
    names): every read ends within READ_BOUND_S, raises nothing but ReadError, and wherever
    Python's tarfile reads the file it yields exactly tarfile's members (names and bytes); the
    same holds for a stream that cannot seek."""
    lenient = _tarfile_skips_malformed_pax_records()
    intact = {layout: read_ours(data)[0] for layout, data in base_shards(FUZZ_SEED).items()}
    outcomes: dict[str, int] = {"read error": 0, "same as tarfile": 0, "damage both read alike": 0,
                                "tarfile cannot read it": 0, "tarfile skips a bad PAX record": 0}
    damaged = damaged_shards(FUZZ_SEED)
    assert len(damaged) >= 500
    for label, data in damaged:
        members, error = read_ours(data)
        streamed, stream_error = read_ours(data, seekable=False)
        assert streamed == members or (stream_error is not None and "seekable" in str(stream_error)
                                       and members[:len(streamed)] == streamed), label
        outcomes["read error"] += error is not None
        expected = read_tarfile(data)
        if expected is None:
            outcomes["tarfile cannot read it"] += 1
        elif members == expected:
            outcomes["same as tarfile"] += 1
            outcomes["damage both read alike"] += members != intact[label.split("-")[0]]
        else:  # only where this Python's tarfile reads on past a PAX record that breaks the framing
            assert lenient and error is not None and "malformed PAX record" in str(error), (label, error)
            assert expected[:len(members)] == members, label
            outcomes["tarfile skips a bad PAX record"] += 1
    # the damage reached every path: some shards fail, many are read alike, some differ from intact
    assert outcomes["read error"] >= 100 and outcomes["same as tarfile"] >= 150, outcomes
    assert outcomes["damage both read alike"] >= 50, outcomes
