"""Durable small-file writes: what makes "the folder was renamed" mean "the bytes are on disk"."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames/creations inside it survive a power loss (best effort:
    some network filesystems refuse O_RDONLY on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write `path` via a sibling temp file + fsync + rename: readers see the old file or the
    complete new one, never a torn write."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_durably(path: Path, obj: Any) -> None:
    """JSON (never pickle) so that per-rank and meta files are inspectable and carry no code.
    Non-JSON values raise TypeError before anything is written."""
    data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=True).encode()
    write_bytes_durably(path, data)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def remove_tree(path: Path) -> bool:
    """rm -rf, best effort (a full disk must not turn a failed save into a second exception).
    Returns whether `path` is gone."""
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()
