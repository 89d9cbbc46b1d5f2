"""Training checkpoints (tgdp/checkpoint/): FSDP2 DCP round trips and resharding with REAL gloo
ranks, atomicity under a killed rank and a full disk, discovery, retention, per-rank JSON/RNG
state, the consolidated export and refusal of malicious pickles."""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import pickle
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from tests.dist_tools import end_worker
from tgdp.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    CheckpointSaveError,
    OptimizerState,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    capture_rng,
    find_latest_complete,
    incompleteness,
    restore_rng,
)
from tgdp.config import ConfigError
from tgdp.parallel import ema_update_, local_pairs

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
WORLD = 2
TIMEOUT = datetime.timedelta(seconds=90)


# ---------------------------------------------------------------------- a small model, training, comparisons
class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 20)
        self.fc2 = nn.Linear(20, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Tiny(nn.Module):
    """Transformer-ish: embed -> 2 residual blocks -> head. The head has 5 rows, so FSDP2's dim-0
    shards on 2 ranks are uneven (3 + 2): the padding path of resharding is exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.blocks = nn.ModuleList([Block(12) for _ in range(2)])
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TrainerState:
    """Stands in for the trainer (a DCP Stateful with plain counters)."""

    def __init__(self) -> None:
        self.step, self.samples_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples_seen": self.samples_seen, "run": "tiny", "betas": (0.9, 0.95)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        assert state["run"] == "tiny" and state["betas"] == (0.9, 0.95)


def build(mesh: Any = None) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """Student, EMA teacher (a deep copy, frozen, no optimizer) and AdamW; FSDP2 per block + root."""
    student = Tiny()
    teacher = copy.deepcopy(student).requires_grad_(False)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for model in (student, teacher):
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
    return student, teacher, torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.05)


def train(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for step in steps:  # data depends on (rank, step) only, like tgdp's step-seeded randomness
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1000 * rank + step))
        student(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema_update_(local_pairs(student, teacher), 0.9)


def app_state(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, trainer: TrainerState) -> dict:
    return {"student": student, "teacher": teacher, "optim": OptimizerState(student, opt), "trainer": trainer}


def full_states(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Gathered (unsharded) CPU state of everything; collective under FSDP2, empty on ranks > 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"student": get_model_state_dict(student, options=options),
            "teacher": get_model_state_dict(teacher, options=options),
            "optim": get_optimizer_state_dict(student, opt, options=options)}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested state (tensors: dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


# ---------------------------------------------------------------------- the 2-rank FSDP2 run
def _two_rank_worker(rank: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    tmp = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    passed = False
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(123)  # NOT the checkpoint's init: the loads below must overwrite everything
        student, teacher, opt = build(mesh)
        trainer = TrainerState()
        app = app_state(student, teacher, opt, trainer)

        # (a) a checkpoint written by ONE unsharded process, loaded into 2-rank FSDP2 models
        one = CheckpointManager(tmp / "one", CheckpointConfig(), rank, WORLD)
        res = one.load(one.latest(), app)
        got = full_states(student, teacher, opt)
        if rank == 0:
            assert_same(got, torch.load(tmp / "one_ref.pt", weights_only=True), "1->2 ranks")
            assert res.rank_state == {"data": {"epoch": 1, "batches": 3}}
        else:  # the checkpoint had no rank 1: the caller gets rank 0's state and a note
            assert res.rank_state is None and not res.rng_restored
            assert res.rank0_state == {"data": {"epoch": 1, "batches": 3}}
            assert any("no state for rank 1" in note for note in res.notes), res.notes
        assert trainer.step == 7 and res.saved_world_size == 1

        # (b) train sharded, then save when rank 0's clock says so (rank 1's clock is skewed)
        train(student, teacher, opt, rank, range(7, 9))
        trainer.step, trainer.samples_seen = 9, 72
        clock = [0.0]
        cfg = CheckpointConfig(every_steps=0, every_minutes=1.0, wall_check_every_steps=1, keep_last=2)
        mgr = CheckpointManager(tmp / "run", cfg, rank, WORLD, clock=lambda: clock[0])
        clock[0] = 3600.0 if rank == 1 else 30.0
        assert mgr.should_save(9) is False  # rank 1 alone thinks an hour passed: rank 0 decides
        clock[0] = 0.0 if rank == 1 else 61.0
        assert mgr.should_save(9) is True
        path = mgr.save(9, app, extra={"wandb_run_id": "wb-123", "config": {"lr": 0.01}},
                        rank_state={"data": {"epoch": 2, "batches": 5 + rank}})
        assert mgr.should_save(9) is False  # never the same step twice
        ref = full_states(student, teacher, opt)
        if rank == 0:
            torch.save(ref, tmp / "two_ref.pt")
        after_save = draws()

        # (c) fresh sharded models + optimizer: load -> bitwise identical, same RNG, same next step
        torch.manual_seed(999)
        random.seed(5)
        np.random.seed(5)
        student2, teacher2, opt2 = build(mesh)
        trainer2 = TrainerState()
        latest = mgr.latest()
        everyone: list[Any] = [None] * WORLD
        dist.all_gather_object(everyone, str(latest))
        assert everyone == [str(path)] * WORLD
        res = mgr.load(latest, app_state(student2, teacher2, opt2, trainer2))
        assert draws() == after_save and res.rng_restored
        got = full_states(student2, teacher2, opt2)
        if rank == 0:
            assert_same(got, ref, "2->2 ranks")
        assert res.step == 9 and trainer2.step == 9 and trainer2.samples_seen == 72
        assert res.rank_state == {"data": {"epoch": 2, "batches": 5 + rank}} and res.notes == []
        assert res.extra == {"wandb_run_id": "wb-123", "config": {"lr": 0.01}}
        train(student, teacher, opt, rank, range(9, 10))
        train(student2, teacher2, opt2, rank, range(9, 10))
        a, b = full_states(student, teacher, opt), full_states(student2, teacher2, opt2)
        if rank == 0:
            assert_same(b, a, "the step after resume")
        (tmp / f"done_rank{rank}").touch()  # proof for the test that every check above ran
        passed = True
    finally:
        end_worker(passed)  # a barrier first: no rank tears down gloo while the other may still talk to it


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    student, teacher, opt = build()
    train(student, teacher, opt, 0, range(0, 2))
    trainer = TrainerState()
    trainer.step = 7
    CheckpointManager(tmp / "one", CheckpointConfig(export_safetensors=False)).save(
        7, app_state(student, teacher, opt, trainer), rank_state={"data": {"epoch": 1, "batches": 3}})
    torch.save(full_states(student, teacher, opt), tmp / "one_ref.pt")
    mp.spawn(_two_rank_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return tmp


@pytest.mark.timeout(150)
def test_fsdp2_two_ranks_round_trip_and_reshard_from_one(two_rank_run: Path) -> None:
    """All checks run inside the ranks (see _two_rank_worker): 1-process checkpoint -> 2 FSDP2
    ranks; 2-rank save -> fresh 2-rank load bitwise (student, teacher, AdamW, trainer counters,
    per-rank JSON, RNG, the next training step); wall-time decision taken by rank 0."""
    assert all((two_rank_run / f"done_rank{rank}").is_file() for rank in range(WORLD))


def test_two_rank_checkpoint_loads_on_one_unsharded_process(two_rank_run: Path) -> None:
    torch.manual_seed(4)
    student, teacher, opt = build()
    trainer = TrainerState()
    mgr = CheckpointManager(two_rank_run / "run", CheckpointConfig())
    res = mgr.load(mgr.latest(), app_state(student, teacher, opt, trainer), restore_rng=False)
    assert_same(full_states(student, teacher, opt), torch.load(two_rank_run / "two_ref.pt", weights_only=True), "2->1")
    assert trainer.step == 9 and res.saved_world_size == 2
    assert res.rank_state == {"data": {"epoch": 2, "batches": 5}}  # rank 0's own
    assert any("world size changed 2 -> 1" in note for note in res.notes)


def test_layout_meta_and_consolidated_export(two_rank_run: Path) -> None:
    from safetensors.torch import load_file

    ckpt = two_rank_run / "run" / "checkpoints" / "step_00000009"
    assert incompleteness(ckpt) is None
    names = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "COMPLETE", "meta.json", "rank_0.json", "rank_1.json", "model.safetensors"} <= names
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 9 and meta["world_size"] == 2 and meta["extra"]["wandb_run_id"] == "wb-123"
    assert meta["app_state"] == ["optim", "student", "teacher", "trainer"]
    rank1 = json.loads((ckpt / "rank_1.json").read_text())
    assert rank1["rank"] == 1 and rank1["state"] == {"data": {"epoch": 2, "batches": 6}}
    assert set(rank1["rng"]) >= {"python", "numpy", "torch"}

    ref = torch.load(two_rank_run / "two_ref.pt", weights_only=True)
    exported = load_file(str(ckpt / "model.safetensors"))
    expected = {f"{m}.{k}": v for m in ("student", "teacher") for k, v in ref[m].items()}
    assert_same(exported, expected, "export")


# ---------------------------------------------------------------------- single-process checks
def _reseal(ckpt: Path, step: int | None = None) -> None:
    """Rewrite the COMPLETE manifest to match the files (as an attacker controlling them all would)."""
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    manifest["files"] = {name: (ckpt / name).stat().st_size for name in manifest["files"]}
    manifest["step"] = manifest["step"] if step is None else step
    (ckpt / "COMPLETE").write_text(json.dumps(manifest))


def small_app(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return {"model": model, "trainer": {"step": seed, "tag": "x"}}


def test_config_validation_names_the_field() -> None:
    CheckpointConfig().validate()
    for field, value in (("every_steps", -1), ("every_minutes", -0.5), ("keep_last", -2), ("folder", "a/b"),
                         ("wall_check_every_steps", 0)):
        with pytest.raises(ConfigError, match=f"checkpoint.{field}"):
            CheckpointConfig(**{field: value}).validate()


def test_should_save_by_steps_and_wall_time(tmp_path: Path) -> None:
    clock = [100.0]
    cfg = CheckpointConfig(every_steps=10, every_minutes=2.0, wall_check_every_steps=5)
    mgr = CheckpointManager(tmp_path, cfg, clock=lambda: clock[0])
    assert [s for s in range(1, 31) if mgr.should_save(s)] == [10, 20, 30]
    clock[0] = 100.0 + 121
    assert not mgr.should_save(31)  # wall time is checked on multiples of wall_check_every_steps only
    assert mgr.should_save(35)
    mgr.save(35, small_app())
    assert not mgr.should_save(35) and not mgr.should_save(36)
    assert not mgr.should_save(45, now=clock[0] + 60)
    assert mgr.should_save(45, now=clock[0] + 121)


def test_keep_last_prunes_old_checkpoints_and_stale_tmp(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2))
    for step in (1, 2, 3):
        mgr.save(step, small_app(step))
    (mgr.root / "step_00000002.tmp").mkdir()  # a crashed save older than the newest complete one
    (mgr.root / "step_00000099.tmp").mkdir()  # a crashed save newer than it: kept for post-mortem
    mgr.save(4, small_app(4))
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step_00000003", "step_00000004", "step_00000099.tmp"]
    mgr.cfg.keep_last = 1
    mgr.prune()
    assert find_latest_complete(mgr.root) == mgr.root / "step_00000004"
    assert not (mgr.root / "step_00000003").exists()


def test_rng_state_json_round_trip() -> None:
    state = json.loads(json.dumps(capture_rng()))  # only JSON, never pickle
    assert isinstance(state["torch"], str)  # base64 of the byte tensor
    first = draws()
    restored, notes = restore_rng(state)
    assert restored and notes == []
    assert draws() == first


def test_broken_folders_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep_last=0, export_safetensors=False))
    good = [mgr.save(step, small_app(step)) for step in (1, 2)]

    def clone(step: int, restep: bool = True) -> Path:
        """A copy of step 2 that is a complete checkpoint for `step` (unless restep=False)."""
        path = Path(shutil.copytree(good[1], mgr.root / f"step_{step:08d}"))
        if restep:
            meta = json.loads((path / "meta.json").read_text())
            (path / "meta.json").write_text(json.dumps({**meta, "step": step}))
            _reseal(path, step)
            assert incompleteness(path) is None
        return path

    shutil.copytree(good[1], mgr.root / "step_00000003.tmp")  # an unfinished save, partial or not
    (clone(4) / "COMPLETE").unlink()  # the marker is written last: missing = unfinished
    (clone(5) / "meta.json").write_text("{not json")  # unreadable meta
    data = next(p for p in clone(6).iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-10])  # truncated shard
    clone(7, restep=False)  # copied under another step's name: COMPLETE names step 2
    caplog.set_level(logging.WARNING, logger="tgdp.checkpoint")
    assert find_latest_complete(mgr.root) == good[1]
    for name, why in (("step_00000003.tmp", "unfinished save"), ("step_00000004", "no COMPLETE"),
                      ("step_00000005", "meta.json"), ("step_00000006", "bytes"), ("step_00000007", "names step 2")):
        assert any(name in r.getMessage() and why in r.getMessage() for r in caplog.records), (name, caplog.text)
    with pytest.raises(CheckpointError, match="step_00000004 is not a complete checkpoint"):
        mgr.load(mgr.root / "step_00000004", small_app())
    with pytest.raises(CheckpointError, match=r"has no \['teacher'\]"):
        mgr.load(good[1], {**small_app(), "teacher": nn.Linear(3, 2)})


def test_failed_save_removes_tmp_and_keeps_previous(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    first = mgr.save(1, small_app(1))
    with pytest.raises(CheckpointSaveError, match="step_00000002.tmp") as info:
        mgr.save(2, small_app(2), rank_state={"bad": object()})  # not JSON
    assert "earlier checkpoints" in str(info.value)
    assert not (mgr.root / "step_00000002.tmp").exists()
    assert find_latest_complete(mgr.root) == first and incompleteness(first) is None


def _disk_full_worker(rank: int, root: str) -> None:
    import resource

    torch.set_num_threads(1)
    mgr = CheckpointManager(root, CheckpointConfig())
    first = mgr.save(1, small_app(1))
    # A real write failure: the file-size limit makes write() fail with EFBIG, as a full disk
    # fails with ENOSPC (SIGXFSZ ignored so the process gets the error instead of dying).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        mgr.save(2, {"big": {"w": torch.zeros(100_000)}})
    except CheckpointSaveError as exc:
        assert "step_00000002.tmp" in str(exc) and "writing" in str(exc), str(exc)
    else:
        raise AssertionError("the save should have failed")
    assert not (mgr.root / "step_00000002.tmp").exists()
    assert find_latest_complete(mgr.root) == first and incompleteness(first) is None


@pytest.mark.timeout(120)
def test_disk_full_during_save(tmp_path: Path) -> None:
    mp.spawn(_disk_full_worker, args=(str(tmp_path),), nprocs=1, join=True)


class _KillDuringSave:
    """A Stateful that SIGKILLs rank 1 while the checkpoint is being written (after the .tmp folder exists)."""

    def __init__(self, rank: int, kill_at: int):
        self.rank, self.kill_at, self.step = rank, kill_at, 0

    def state_dict(self) -> dict[str, Any]:
        if self.rank == 1 and self.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def _crash_worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    trainer = _KillDuringSave(rank, kill_at=2)
    mgr = CheckpointManager(root, CheckpointConfig(), rank, WORLD)
    model = nn.Linear(3, 2)
    for step in (1, 2):
        trainer.step = step
        mgr.save(step, {"model": model, "trainer": trainer})


@pytest.mark.timeout(120)
def test_rank_killed_mid_save_leaves_previous_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_crash_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    root = tmp_path / "checkpoints"
    assert (root / "step_00000002.tmp").is_dir() and not (root / "step_00000002").exists()
    caplog.set_level(logging.WARNING, logger="tgdp.checkpoint")
    assert find_latest_complete(root) == root / "step_00000001"
    assert "step_00000002.tmp" in caplog.text
    trainer = _KillDuringSave(0, kill_at=-1)
    CheckpointManager(tmp_path, CheckpointConfig()).load(root / "step_00000001", {"model": nn.Linear(3, 2),
                                                                                  "trainer": trainer})
    assert trainer.step == 1


# ---------------------------------------------------------------------- security
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_malicious_metadata_is_refused_without_running_it(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    ckpt = mgr.save(1, small_app(1))
    original = (ckpt / ".metadata").read_bytes()
    marker = tmp_path / "PWNED"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _reseal(ckpt)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
        mgr.load(ckpt, small_app())
    with pytest.raises(BaseException, match="posix.system"):  # our reader inside plain DCP too
        dcp.load({"model": nn.Linear(3, 2).state_dict()}, storage_reader=SafeFileSystemReader(ckpt))
    assert not marker.exists()

    md = pickle.loads(original)  # trusted here: we wrote it a moment ago
    first = next(iter(md.storage_data))
    md.storage_data[first].relative_path = "../../outside.distcp"
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    _reseal(ckpt)
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint folder"):
        mgr.load(ckpt, small_app())


def test_malicious_non_tensor_entry_is_refused_without_running_it(tmp_path: Path) -> None:
    """Non-tensor values are torch.save blobs that stock DCP reads with weights_only=False."""
    import io

    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    ckpt = mgr.save(1, small_app(1))
    marker = tmp_path / "PWNED"
    blob = io.BytesIO()
    torch.save(_Evil(marker), blob)
    md = pickle.loads((ckpt / ".metadata").read_bytes())  # trusted: we wrote it
    index = next(i for i in md.storage_data if i.fqn == "trainer.tag")
    info = md.storage_data[index]
    data = ckpt / info.relative_path
    info.offset, info.length = data.stat().st_size, len(blob.getvalue())
    with open(data, "ab") as f:
        f.write(blob.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    _reseal(ckpt)
    with pytest.raises(UnsafeCheckpointError, match="trainer.tag"):
        mgr.load(ckpt, small_app())
    assert not marker.exists()
