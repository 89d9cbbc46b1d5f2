"""Bad configuration and bad paths at every entry point: each stops with exit code 2 BEFORE any
work (no process group, no model, no output folder), naming the field or path and what it
expects, without a traceback. Cases already covered elsewhere are listed in docs/reliability.md
(test_train.py::test_bad_config_stops_before_any_work, test_make_shards.py::
test_bad_manifest_and_config_are_named, test_synthetic.py::test_cli_runs_from_a_checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fault_tools import process_env
from tests.shard_factory import make_shards

TRAIN = [sys.executable, "-m", "tgdp.train", "--config", "tiny"]
MAKE_SHARDS = [sys.executable, str(REPO / "data_tools" / "make_shards.py")]
MAKE_SYNTHETIC = [sys.executable, str(REPO / "data_tools" / "make_synthetic.py")]

# (entry point, arguments ({shards}, {file}, {new} are filled in), what stderr must say)
CASES = {
    "train_missing_shards": (TRAIN, ["--run-dir", "{new}", "data.shards={file}.d"], ["data.shards=", "no shard index"]),
    "train_run_dir_is_a_file": (TRAIN, ["--shards", "{shards}", "--run-dir", "{file}"],
                                ["run_dir=", "is a file: expected a folder"]),
    "train_missing_init_checkpoint": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}", "init.mae_checkpoint={new}.pth"],
                                      ["init.mae_checkpoint=", "is not a file: expected a checkpoint"]),
    "train_unknown_field": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}", "optim.learning_rate=1"],
                            ["learning_rate", "optim"]),
    "train_device_guard_without_fused_adamw": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}", "optim.fused=false",
                                                       "nonfinite_guard=device"], ["nonfinite_guard=device", "optim.fused=true"]),
    "train_tgdp_without_cls_token": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}", "model.cls_token=false"],
                                     ["task.mode=tgdp needs model.cls_token=true"]),
    "train_mask_ratio_keeps_no_patch": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}",
                                                "task.contrastive_mask_ratio=0.95"],
                                        ["task.contrastive_mask_ratio=0.95 keeps no video patch of the 16"]),
    "train_epoch_mode_with_too_few_shards": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}", "data.mode=epoch",
                                                     "data.num_workers=3"],
                                             ["data.mode=epoch needs at least world_size x num_workers = 1 x 3"]),
    "train_hsdp_group_does_not_divide_the_world": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}",
                                                           "parallel.backend=hsdp", "parallel.shard_group_size=2"],
                                                   ["parallel.shard_group_size=2 must divide the world size 1"]),
    "train_data_wait_not_below_the_peer_timeout": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}",
                                                           "data.wait_timeout_s=100", "parallel.timeout_s=50"],
                                                   ["data.wait_timeout_s (100) must be below parallel.timeout_s (50)"]),
    "train_wrong_type": (TRAIN, ["--shards", "{shards}", "--run-dir", "{new}", "total_steps=many"], ["total_steps"]),
    "train_missing_preset_file": ([sys.executable, "-m", "tgdp.train", "--config", "{new}.yaml"], [],
                                  ["config file", "does not exist"]),
    "make_shards_missing_input": (MAKE_SHARDS, ["--input", "{new}.csv", "--output", "{new}"],
                                  ["input", "does not exist", "CSV manifest"]),
    "make_shards_output_is_a_file": (MAKE_SHARDS, ["--input", "{shards}", "--output", "{file}"],
                                     ["output", "is a file: expected a folder"]),
    "make_shards_bad_value": (MAKE_SHARDS, ["--input", "{shards}", "--output", "{new}", "max_samples_per_shard=0"],
                              ["max_samples_per_shard must be >= 1"]),
    "make_synthetic_output_is_a_file": (MAKE_SYNTHETIC, ["--output", "{file}"], ["output", "is a file: expected a folder"]),
    "make_synthetic_bad_rate": (MAKE_SYNTHETIC, ["--output", "{new}", "sample_rate=12345"], ["sample_rate", "AAC rate"]),
}


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_config")
    make_shards(root / "shards", num_shards=2, samples_per_shard=4)
    (root / "a_file").write_text("not a folder\n")
    return {"shards": root / "shards", "file": root / "a_file", "new": root / "new"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_entry_point_refuses_bad_config_before_any_work(case, places):
    command, arguments, expected = CASES[case]
    fill = lambda s: s.format(**{k: str(v) for k, v in places.items()})  # noqa: E731
    proc = subprocess.run([fill(c) for c in command] + [fill(a) for a in arguments], cwd=REPO, env=process_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for text in expected:
        assert fill(text) in proc.stderr, (text, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not list(places["new"].parent.glob("new*")), "an output was created before the config was checked"
