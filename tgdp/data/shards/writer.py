"""Shard files: size-bounded tars written under a temporary name, renamed when complete, and a
journal that lets a re-run pick up after the last finished shard.

Crash safety: a shard is written to `<name>.tar.tmp`, fsync'ed, renamed to `<name>.tar`, and only
then recorded in the journal. A crash leaves at most a `.tmp` file (deleted on resume) or a
finished shard not yet in the journal (rewritten identically on resume, since the plan is
deterministic). No half-written shard is ever visible under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from tgdp.data.format import META_EXT, ContentSummary, ShardInfo

JOURNAL_NAME = ".make_shards.journal.jsonl"


class ResumeMismatchError(RuntimeError):
    """The output folder holds a run with a different plan (other inputs or parameters)."""


def plan_fingerprint(keys: list[str], params: dict[str, Any]) -> str:
    """Identifies a run: the ordered clip keys plus every parameter that changes the output."""
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True).encode())
    for key in keys:
        h.update(key.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


@dataclass
class JournalEntry:
    shard: ShardInfo
    plan_end: int  # plan positions [previous plan_end, plan_end) are accounted for by this shard
    failures: list[dict[str, str]] = field(default_factory=list)
    content: ContentSummary | None = None  # None: a journal line written before tgdp recorded it
    frame_gaps: list[dict[str, Any]] = field(default_factory=list)  # clips stored with missing frames


class Journal:
    """Append-only record of finished shards (JSON lines, each flushed and fsync'ed)."""

    def __init__(self, root: Path, fingerprint: str):
        self.path = root / JOURNAL_NAME
        self.fingerprint = fingerprint
        self.entries: list[JournalEntry] = []

    def load_or_start(self) -> None:
        if not self.path.exists():
            self._append({"fingerprint": self.fingerprint})
            return
        with open(self.path, encoding="utf-8") as fh:
            lines = [line for line in fh.read().splitlines() if line.strip()]
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything before it is valid
        if not records or records[0].get("fingerprint") != self.fingerprint:
            raise ResumeMismatchError(
                f"{self.path.parent} holds shards from a different make_shards run (other inputs, seed or "
                "parameters); write to a new --output folder, or delete that folder to start over"
            )
        for rec in records[1:]:
            info = ShardInfo(rec["name"], int(rec["samples"]), int(rec["bytes"]))
            content = ContentSummary.from_json(rec["content"]) if "content" in rec else None
            self.entries.append(JournalEntry(info, int(rec["plan_end"]), list(rec.get("failures", [])), content,
                                             list(rec.get("frame_gaps", []))))
        self._rewrite(records[: 1 + len(self.entries)])

    def record(self, entry: JournalEntry) -> None:
        self.entries.append(entry)
        s = entry.shard
        self._append({"name": s.name, "samples": s.samples, "bytes": s.bytes, "plan_end": entry.plan_end,
                      "failures": entry.failures, "frame_gaps": entry.frame_gaps,
                      "content": (entry.content or ContentSummary()).to_json()})

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class RollingShardWriter:
    """Writes samples into `<prefix>-NNNNNN.tar`, starting a new shard at a sample or byte limit."""

    def __init__(self, root: Path, prefix: str, max_samples: int, max_bytes: int, first_index: int):
        self.root, self.prefix = root, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.index = first_index
        self._tar: wds.TarWriter | None = None
        self._stream = None
        self.samples = 0
        self._content = 0  # tar bytes of the samples in the open shard

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.index:06d}.tar"

    def would_overflow(self, sample_bytes: int) -> bool:
        """True when this sample should go into a new shard (never leaves a shard empty)."""
        if self._tar is None or self.samples == 0:
            return False
        # tarfile's stream mode buffers, so the file position lags: count the bytes ourselves.
        return self.samples >= self.max_samples or _closed_tar_size(self._content + sample_bytes) > self.max_bytes

    def write(self, sample: dict[str, bytes]) -> None:
        if self._tar is None:
            self._stream = open(self.root / (self.name + ".tmp"), "wb")
            # A fixed INTEGER mtime: a resumed run rewrites a shard byte-for-byte identically, and a
            # float (webdataset's default, time.time()) costs a 1 KB PAX header on every member.
            self._tar = wds.TarWriter(self._stream, mtime=0, mode=0o644)
        self._tar.write(sample)
        self.samples += 1
        self._content += sample_size(sample)

    def finish(self) -> ShardInfo | None:
        """Close the current shard durably and rename it to its final name."""
        if self._tar is None:
            return None
        self._tar.close()  # closes the tar stream (end-of-archive blocks); the file stays open
        self._stream.flush()
        os.fsync(self._stream.fileno())
        size = self._stream.tell()
        self._stream.close()
        os.replace(self.root / (self.name + ".tmp"), self.root / self.name)
        _fsync_dir(self.root)
        info = ShardInfo(self.name, self.samples, size)
        self._tar, self._stream, self.samples, self._content = None, None, 0, 0
        self.index += 1
        return info

    def abort(self) -> None:
        """Drop an unfinished shard (its samples are redone by the next run). Called while an
        error propagates, often a full disk: closing may fail the same way (it flushes), and
        must neither hide that error nor leave the `.tmp` file behind."""
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass
            try:
                (self.root / (self.name + ".tmp")).unlink(missing_ok=True)
            except OSError:  # remove_stale_temporaries deletes it on the next run
                pass
        self._tar, self._stream, self.samples, self._content = None, None, 0, 0


def sample_size(sample: dict[str, bytes]) -> int:
    """Bytes a sample adds to a tar: 512-byte header + payload rounded up to 512, per member
    (member names over 100 characters add a long-name header; keys are kept short enough)."""
    return sum(512 + (len(v) + 511) // 512 * 512 for k, v in sample.items() if not k.startswith("__"))


def _closed_tar_size(content_bytes: int) -> int:
    """Size of the tar once closed: two zero blocks, then padding to tarfile's 10240-byte records."""
    record = tarfile.RECORDSIZE
    return (content_bytes + 2 * tarfile.BLOCKSIZE + record - 1) // record * record


def remove_stale_temporaries(root: Path) -> list[str]:
    stale = sorted(root.glob("*.tar.tmp"))
    for path in stale:
        path.unlink()
    return [p.name for p in stale]


def summarise_shard(path: Path) -> ContentSummary:
    """Frame and label counts of a finished shard, from its json members (nothing else is read)."""
    summary = ContentSummary()
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith("." + META_EXT):
                fh = tar.extractfile(member)
                if fh is not None:
                    summary.add(json.loads(fh.read().decode("utf-8")))
    return summary


def verify_tar(path: Path) -> bool:
    """A cheap completeness check of a finished shard (readable to its end)."""
    try:
        with tarfile.open(path) as tar:
            for _ in tar:
                pass
        return True
    except (tarfile.TarError, OSError, EOFError):
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
