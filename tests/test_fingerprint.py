"""The checkpoint fingerprint (tgdp/checkpoint/fingerprint.py): exact, independent of sharding, and
sensitive to any changed or moved value; a resume that loads other values is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.dist_tools import end_worker
from tgdp.checkpoint import CheckpointConfig, CheckpointManager
from tgdp.checkpoint.fingerprint import fingerprint
from tgdp.checkpoint.errors import CheckpointError


def make_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
                      "steps": torch.tensor(7)},
            "optim": {"param_groups": [{"lr": 1e-3, "params": ["w", "b"]}], "step": 12}}


def test_fingerprint_is_exact_and_sees_every_change():
    base = fingerprint(make_state())
    assert base == fingerprint(make_state()) and set(base) == {"model", "optim"}
    state = make_state()
    state["model"]["w"][2, 1] = torch.nextafter(state["model"]["w"][2, 1], torch.tensor(9.0))  # one ulp
    assert fingerprint(state)["model"] != base["model"] and fingerprint(state)["optim"] == base["optim"]
    swapped = make_state()
    swapped["model"]["w"][[0, 1]] = swapped["model"]["w"][[1, 0]]  # same values, other places
    assert fingerprint(swapped)["model"] != base["model"]
    renamed = make_state()
    renamed["model"]["w2"] = renamed["model"].pop("w")
    assert fingerprint(renamed)["model"] != base["model"]
    lr = make_state()
    lr["optim"]["param_groups"][0]["lr"] = 2e-3
    assert fingerprint(lr)["optim"] != base["optim"]


def _sharded_worker(rank: int, root: str, expected: dict) -> None:
    passed = False
    try:
        dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        full = make_state()
        # uneven rows (5 over 2 ranks: 3 + 2) exercise the shard offsets
        sharded = {"model": {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() else v
                             for k, v in full["model"].items()}, "optim": full["optim"]}
        assert fingerprint(sharded) == expected
        passed = True
    finally:
        end_worker(passed)


def test_fingerprint_of_a_sharded_state_equals_the_full_one(tmp_path):
    mp.spawn(_sharded_worker, args=(str(tmp_path), fingerprint(make_state())), nprocs=2, join=True)


def test_resume_refuses_a_checkpoint_whose_loaded_values_differ(tmp_path: Path):
    model = nn.Linear(4, 3)
    manager = CheckpointManager(tmp_path, CheckpointConfig(export_safetensors=False))
    saved = manager.save(5, {"student": model})
    meta = json.loads((saved / "meta.json").read_text())
    assert set(meta["fingerprint"]) == {"student"}

    restored = nn.Linear(4, 3)
    assert manager.resume({"student": restored}) is not None  # verified: loads what was saved
    assert torch.equal(restored.weight, model.weight)

    # Simulate a loading path that delivers other values: the recorded fingerprint no longer matches.
    # (edited in place: the COMPLETE manifest records every file's size)
    text = (saved / "meta.json").read_text()
    (saved / "meta.json").write_text(text.replace(meta["fingerprint"]["student"], "0" * 16))
    with pytest.raises(CheckpointError, match=r"loaded \['student'\] differ from what was saved"):
        manager.resume({"student": nn.Linear(4, 3)})
    manager.load(saved, {"student": nn.Linear(4, 3)})  # a plain load (eval) does not verify
