"""Reading DCP checkpoints without running code from them (checkpoints are untrusted input).

A DCP checkpoint has three kinds of content, and stock torch (2.14) reads them as follows:

* `.metadata`  - `pickle.load` by `FileSystemReader.read_metadata`: FULL pickle. A crafted file
  runs arbitrary code (`os.system`) the moment it is read. `SafeFileSystemReader` replaces it
  with `RestrictedUnpickler`, whose allow-list is exactly what DCP metadata needs (below).
* tensor payloads - `torch.load(..., weights_only=True)` inside `FileSystemReader.read_data`:
  safe already (tensors and plain containers only; explicit `weights_only=True` cannot be
  overridden by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
* non-tensor values (optimizer hyper-parameters, `step` ints, strings) - stored as torch.save
  blobs and read by `DefaultLoadPlanner.load_bytes` with `torch.load(weights_only=False)`: FULL
  pickle again. `SafeLoadPlanner` reads them with `weights_only=True`.

The allow-list was measured by saving real checkpoints (plain modules, FSDP2 DTensors, AdamW,
ints/floats/strings/tuples/None) and recording every global the pickle asks for:

    torch.distributed.checkpoint.metadata: Metadata, TensorStorageMetadata, BytesStorageMetadata,
        ChunkStorageMetadata, TensorProperties, MetadataIndex, StorageMeta, _MEM_FORMAT_ENCODING
    torch.distributed.checkpoint.filesystem: _StorageInfo
    torch: Size and the dtypes (torch.float32, torch.bfloat16, ...; checked to BE a torch.dtype)
    torch.serialization: _get_layout (maps "torch.strided" to the layout object)
    pathlib: PosixPath, PurePosixPath (StorageMeta.checkpoint_id); WindowsPath is read as
        PureWindowsPath (it cannot be instantiated on Linux)

Every one of these only builds a value: dataclass/enum constructors, `torch.Size(tuple)`, a
dict lookup, a path object. Nothing from `builtins` is needed (no getattr/eval/exec/apply).
`collections.OrderedDict` is not needed either and is therefore not allowed.

Beyond code execution, the metadata also names the files DCP opens: `_StorageInfo.relative_path`
must be a plain file name inside the checkpoint folder (no `../`, no absolute path).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner itself uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from tgdp.checkpoint.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "SafeFileSystemReader", "SafeLoadPlanner", "read_dcp_metadata"]

METADATA_FILE = ".metadata"  # torch.distributed.checkpoint.filesystem._metadata_fn

_DCP_META = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(_DCP_META, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                    "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                    "StorageMeta", "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
       ("pathlib", "PureWindowsPath")}
)
_RENAMED = {("pathlib", "WindowsPath"): ("pathlib", "PureWindowsPath")}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS` (+ torch dtypes); anything else is refused
    BEFORE it is imported or called, so a payload such as `os.system` never runs."""

    def __init__(self, file: IO[bytes], source: str = "<stream>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        module, name = _RENAMED.get((module, name), (module, name))
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing DCP metadata {self.source}: it asks for the global {module}.{name}, which DCP metadata never "
            "contains (a tampered or foreign file); nothing from it was executed")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refusing DCP metadata {self.source}: it contains a persistent id")


def _check_metadata(md: Any, source: str) -> Metadata:
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"refusing DCP metadata {source}: it holds a {type(md).__name__}, not a Metadata")
    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"DCP metadata {source} is malformed (state_dict_metadata / storage_data not dicts)")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or PurePosixPath(rel).name != rel or rel in (".", ".."):
            raise UnsafeCheckpointError(
                f"refusing DCP metadata {source}: it points outside the checkpoint folder ({rel!r})")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0 and info.length >= 0):
            raise CheckpointError(f"DCP metadata {source} is malformed (offset/length of {rel!r})")
    return md


def load_metadata(stream: IO[bytes], source: str) -> Metadata:
    """Unpickle DCP metadata from `stream` with the restricted unpickler and sanity-check it."""
    try:
        md = RestrictedUnpickler(stream, source).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated file, bad opcode, dataclass arity, ...
        raise CheckpointError(f"unreadable DCP metadata {source}: {type(exc).__name__}: {exc}") from exc
    return _check_metadata(md, source)


def read_dcp_metadata(folder: str | Path) -> Metadata:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no DCP {METADATA_FILE} file")
    with open(path, "rb") as stream:
        return load_metadata(stream, str(path))


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose `read_metadata` uses `RestrictedUnpickler` (same contract as torch
    2.14's: `rank=` selects the per-rank `__<rank>.metadata` of no-collective saves, and the
    returned metadata carries this reader's `load_id`)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        path = self.fs.concat_path(self.path, name)
        with self.fs.create_stream(path, "rb") as stream:
            md = load_metadata(stream, str(path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` whose non-tensor values are read with `torch.load(weights_only=True)`.

    Consequence for what may be checkpointed: non-tensor values in the app state must be plain
    Python (None, bool, int, float, str, bytes, list, tuple, dict) - no numpy scalars, no custom
    classes. Save-side nothing changes; a violating value fails at LOAD time with a clear error,
    so `CheckpointManager.save` is tested against loading in tests/test_checkpoint.py."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing checkpoint entry {fqn!r}: it is not a plain value or tensor ({_reason(exc)}); "
                "it was NOT unpickled") from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _reason(exc: Exception) -> str:
    """The informative part of torch's weights-only error ("Unsupported global: GLOBAL os.system ...")."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please")[0].strip()
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
