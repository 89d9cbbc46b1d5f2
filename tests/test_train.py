"""End-to-end pretraining on real shards: 2 gloo ranks under torchrun, SIGTERM, exact resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, synthetic_shards
from tgdp.metrics import read_metrics

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> Path:
    """32 synthetic clips in 8 shards: enough for 2 ranks and a learning signal."""
    return synthetic_shards(tmp_path_factory.mktemp("train"), num_clips=32, duration=10.0)


def common(shards: Path, steps: int) -> list[str]:
    return ["--config", "tiny", "--shards", str(shards), "--steps", str(steps), "logging.wandb=false",
            "logging.log_every=1", "logging.image_every=0", "checkpoint.every_steps=0", "data.batch_size=4"]


def torchrun(args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), "tgdp/train.py", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_one_process(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m tgdp.train ARGS` in one process (no launcher), output captured."""
    return subprocess.run([sys.executable, "-m", "tgdp.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_metrics(metrics)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and any(k.startswith("teacher.") for k in wa)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero2", "zero3"])
def test_two_ranks_sigterm_resume_is_bitwise_exact(train_shards, tmp_path, backend):
    """N steps straight == N/2 steps, SIGTERM, resume, the rest: student, teacher (the export) and
    every logged loss bitwise. ZeRO checkpoints go through tgdp/parallel/zero_state.py (fp32
    masters, AdamW moments and step, engine counters, ZeRO-3 teacher partitions)."""
    steps = 14
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = common(train_shards, steps) + [f"parallel.backend={backend}"]
    out = finish(torchrun(args + ["--run-dir", str(straight)], free_port()))
    assert (straight / "export" / "model.safetensors").is_file(), out

    proc = torchrun(args + ["--run-dir", str(resumed)], free_port())
    wait_for_step(resumed / "metrics.jsonl", steps // 2, proc)
    for child in _children(proc.pid):  # Slurm / torchrun deliver SIGTERM to the workers
        os.kill(child, signal.SIGTERM)
    first = finish(proc)
    saved = sorted((resumed / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and steps // 2 <= int(saved[0].name[5:]) < steps, first
    assert "stopped at step" in first
    second = finish(torchrun(args + ["--run-dir", str(resumed)], free_port()))
    assert "resumed from" in second, second

    assert_same_weights(straight / "export" / "model.safetensors", resumed / "export" / "model.safetensors")
    losses = lambda run: [(r["step"], r["loss"], r["loss/distill"]) for r in read_metrics(run / "metrics.jsonl")]  # noqa: E731
    assert losses(straight) == losses(resumed) and len(losses(straight)) == steps

    # the 2-rank checkpoint loads on ONE process (model and optimizer reshard; data restarts its layout)
    one = train_one_process(*common(train_shards, steps + 3), "--run-dir", str(resumed), "parallel.backend=none")
    assert one.returncode == 0, one.stdout + one.stderr
    # the newest complete checkpoint is the second run's final one
    assert f"resumed from {resumed / 'checkpoints' / f'step_{steps:08d}'} at step {steps}" in one.stderr, one.stderr
    assert read_metrics(resumed / "metrics.jsonl")[-1]["step"] == steps + 3
    if backend == "fsdp2":  # ... and that checkpoint (no DeepSpeed engine in it) continues under ZeRO-2
        zero = finish(torchrun(common(train_shards, steps + 5) + ["--run-dir", str(resumed), "parallel.backend=zero2"],
                               free_port()))
        assert "written without a DeepSpeed engine" in zero and "resumed from" in zero, zero
        tail = read_metrics(resumed / "metrics.jsonl")[-2:]
        assert [r["step"] for r in tail] == [steps + 4, steps + 5] and all(r["train/step_applied"] == 1 for r in tail)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_tiny_model_learns_on_the_synthetic_corpus(train_shards, tmp_path):
    """Loss goes down and audio-visual matching rises well above chance (1/8 at batch 8)."""
    run = tmp_path / "learn"
    proc = train_one_process(*common(train_shards, 240), "--run-dir", str(run), "parallel.backend=none",
                             "data.batch_size=8", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 240
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    first, last = records[:20], records[-40:]  # single steps are noisy at batch 8: average windows
    assert mean(last, "loss/recon") < 0.5 * mean(first, "loss/recon")
    assert mean(last, "loss/contrastive") < mean(first, "loss/contrastive") - 0.3
    assert mean(last, "train/contrastive_acc") > 2 * 0.125  # chance is 1/8
    assert mean(last, "train/contrastive_acc") > mean(first, "train/contrastive_acc") + 0.08


def test_nonfinite_steps_are_skipped_then_stop_cleanly(train_shards, tmp_path):
    run = tmp_path / "nan"
    proc = train_one_process(*common(train_shards, 8), "--run-dir", str(run), "parallel.backend=none",
                             "inject_nonfinite_steps=[3]")
    assert proc.returncode == 0, proc.stderr
    applied = {r["step"]: r["train/step_applied"] for r in read_metrics(run / "metrics.jsonl")}
    assert applied[3] == 0.0 and all(v == 1.0 for s, v in applied.items() if s != 3)
    assert "non-finite loss or gradient, update skipped" in proc.stderr

    run2 = tmp_path / "nan_stop"
    proc = train_one_process(*common(train_shards, 10), "--run-dir", str(run2), "parallel.backend=none",
                             "inject_nonfinite_steps=[5,6,7]", "max_nonfinite_steps=3")
    assert proc.returncode == 3, proc.stderr
    assert "3 consecutive steps with non-finite" in proc.stderr
    # the checkpoint holds the last good state: 7 steps counted (and 7 batches read), the updates
    # of 5, 6 and 7 never applied
    assert sorted(p.name for p in (run2 / "checkpoints").glob("step_*")) == ["step_00000007"]


def _same_records(a: list[dict], b: list[dict]) -> bool:
    """Metric records equal key by key, NaN equal to NaN, timings, throughput and memory aside."""
    def clean(r: dict) -> dict:
        return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()
                if not k.startswith(("perf/", "mem/")) and k != "time"}
    return [clean(r) for r in a] == [clean(r) for r in b]


def test_device_side_guard_matches_the_host_side_guard_bitwise(train_shards, tmp_path):
    """nonfinite_guard=device (fused AdamW skips on the device, the host reads the verdict a step
    later) against nonfinite_guard=host (one read per step), same fused optimizer: the same
    skipped step, the same losses and norms after it, bitwise the same exported student and
    teacher; and a stop after K bad steps in a row leaves the same last good state."""
    fused = ["parallel.backend=none", "optim.fused=true"]
    records, weights = {}, {}
    for mode in ("host", "device"):
        run = tmp_path / f"skip_{mode}"
        proc = train_one_process(*common(train_shards, 6), "--run-dir", str(run), *fused, f"nonfinite_guard={mode}",
                                 "inject_nonfinite_steps=[3]", "logging.log_every=2")
        assert proc.returncode == 0, proc.stderr
        assert "step 3: non-finite loss or gradient, update skipped (1 in a row)" in proc.stderr
        records[mode] = read_metrics(run / "metrics.jsonl")
        weights[mode] = load_file(run / "export" / "model.safetensors")
    assert [r["step"] for r in records["device"]] == [2, 4, 6]
    assert _same_records(records["host"], records["device"])
    assert weights["host"].keys() == weights["device"].keys()
    assert all(torch.equal(weights["host"][k], weights["device"][k]) for k in weights["host"])

    stopped = {}
    for mode, expected in (("host", "step_00000007"), ("device", "step_00000008")):
        run = tmp_path / f"stop_{mode}"
        proc = train_one_process(*common(train_shards, 10), "--run-dir", str(run), *fused, f"nonfinite_guard={mode}",
                                 "inject_nonfinite_steps=[5,6,7]", "max_nonfinite_steps=3", "logging.log_every=100")
        assert proc.returncode == 3, proc.stderr
        assert "3 consecutive steps with non-finite loss/gradients (last: step 7)" in proc.stderr
        # device: step 8 was already queued when the host read step 7's verdict; the device froze it
        assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [expected]
        steps = expected.split("_")[1].lstrip("0")
        proc = train_one_process(*common(train_shards, int(steps)), "--run-dir", str(run), *fused,
                                 f"nonfinite_guard={mode}")  # resume at the last step: export what was saved
        assert proc.returncode == 0, proc.stderr
        stopped[mode] = load_file(run / "export" / "model.safetensors")
    assert all(torch.equal(stopped["host"][k], stopped["device"][k]) for k in stopped["host"])


@pytest.mark.slow
def test_device_side_guard_on_two_fsdp2_ranks(train_shards, tmp_path):
    """The device-side skip through FSDP2's DTensor parameters (fused AdamW's `found_inf` is a
    plain tensor) and the all-reduced verdict on 2 gloo ranks: bitwise the host-side guard's run."""
    records, weights = {}, {}
    for mode in ("host", "device"):
        run = tmp_path / mode
        out = finish(torchrun(common(train_shards, 4) + [
            "--run-dir", str(run), "parallel.backend=fsdp2", "optim.fused=true", f"nonfinite_guard={mode}",
            "inject_nonfinite_steps=[2]"], free_port()))
        records[mode] = read_metrics(run / "metrics.jsonl")
        assert [r["train/step_applied"] for r in records[mode]] == [1.0, 0.0, 1.0, 1.0], out
        weights[mode] = load_file(run / "export" / "model.safetensors")
    assert _same_records(records["host"], records["device"])
    assert all(torch.equal(weights["host"][k], weights["device"][k]) for k in weights["host"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_zero_skips_a_nonfinite_step_and_drops_its_partial_gradients(train_shards, tmp_path, backend):
    """grad_accum=2 under DeepSpeed: a NaN in the 2nd micro-batch of step 2 (the 1st already
    reduced into ZeRO's gradient partitions) skips step 2 and leaves nothing behind: the run
    continues exactly like one whose step 2 was NaN in both micro-batches."""
    losses = {}
    for micro in ("1", "-1"):
        run = tmp_path / f"micro{micro}"
        out = finish(torchrun(common(train_shards, 4) + [
            "--run-dir", str(run), f"parallel.backend={backend}", "grad_accum=2", "inject_nonfinite_steps=[2]",
            f"inject_nonfinite_micro={micro}", "checkpoint.every_steps=0", "export_on_finish=false"], free_port()))
        records = read_metrics(run / "metrics.jsonl")
        assert [r["train/step_applied"] for r in records] == [1.0, 0.0, 1.0, 1.0], out
        assert "non-finite loss or gradient, update skipped (1 in a row)" in out
        losses[micro] = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses["1"][2:])
    assert losses["1"][2:] == losses["-1"][2:]


def test_resume_refuses_an_incompatible_config_and_notes_harmless_changes(train_shards, tmp_path):
    run = tmp_path / "cfg"
    base = [*common(train_shards, 2), "--run-dir", str(run), "parallel.backend=none", "checkpoint.every_steps=1"]
    first = train_one_process(*base)
    assert first.returncode == 0, first.stderr
    clash = train_one_process(*base, "--steps", "3", "task.mode=dual")
    assert clash.returncode == 2, clash.stderr
    assert "cannot resume" in clash.stderr and "task.mode: checkpoint 'tgdp', now 'dual'" in clash.stderr
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 2  # nothing trained under it
    fine = train_one_process(*base, "--steps", "3", "logging.log_every=2")
    assert fine.returncode == 0, fine.stderr
    assert "resuming step_00000002 with changed settings" in fine.stderr and "logging.log_every=1->2" in fine.stderr
    assert "resumed from" in fine.stderr


def test_bad_config_stops_before_any_work(tmp_path):
    proc = train_one_process("--config", "tiny", "--run-dir", str(tmp_path / "r"), "data.shards=/nonexistent",
                             "model.audio_frames=96", timeout=120)
    assert proc.returncode == 2 and "data.audio_frames" in proc.stderr and "model.audio_frames" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_every_backend_trains_the_same_steps_with_gradient_accumulation(train_shards, tmp_path):
    """ddp, fsdp2, zero2 and zero3 on 2 ranks, grad_accum=2: same data, same init -> the same losses at
    every step. The later steps compare the updates too: DeepSpeed gets the task's already-averaged
    micro-batch losses (no second 1/grad_accum) and the step boundary from the trainer."""
    losses = {}
    for backend in ("ddp", "fsdp2", "zero2", "zero3"):
        run = tmp_path / backend
        out = finish(torchrun(common(train_shards, 3) + ["--run-dir", str(run), f"parallel.backend={backend}",
                                                         "grad_accum=2"], free_port()))
        records = read_metrics(run / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2, 3], out
        assert all(r["train/step_applied"] == 1.0 and math.isfinite(r["train/grad_norm"]) for r in records)
        losses[backend] = [r["loss"] for r in records]
    for backend, values in losses.items():
        assert values == pytest.approx(losses["ddp"], abs=2e-4), (backend, losses)
    assert losses["ddp"][2] != pytest.approx(losses["ddp"][0], abs=1e-3)  # the updates moved the loss


@pytest.mark.slow
def test_accelerate_launch_runs_two_sharded_ranks(train_shards, tmp_path):
    """`accelerate launch --config_file ds_configs/cpu_fsdp2.yaml tgdp/train.py` really starts 2 ranks
    (accelerate's --cpu launcher silently starts one) and trains a sharded student."""
    run = tmp_path / "acc"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([accelerate, "launch", "--config_file", "ds_configs/cpu_fsdp2.yaml",
                           "--main_process_port", str(free_port()), "tgdp/train.py", *common(train_shards, 3),
                           "--run-dir", str(run)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = run / "checkpoints" / "step_00000003"
    assert (final / "rank_0.json").is_file() and (final / "rank_1.json").is_file()
    assert sorted(p.name for p in final.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_deferred_gradient_sync_equals_reducing_every_micro_batch(train_shards, tmp_path, backend):
    """grad_accum=2: one reduction per step (no_sync / set_requires_gradient_sync) trains the same
    weights as reducing after every micro-batch (sums commute; only float order differs)."""
    weights = {}
    for defer in ("true", "false"):
        run = tmp_path / defer
        out = finish(torchrun(common(train_shards, 2) + ["--run-dir", str(run), f"parallel.backend={backend}",
                                                         "grad_accum=2", f"parallel.defer_grad_sync={defer}"],
                              free_port()))
        exports = sorted(run.glob("export/*.safetensors")) or sorted(run.rglob("*.safetensors"))
        assert exports, out
        weights[defer] = load_file(exports[-1])
    assert weights["true"].keys() == weights["false"].keys()
    moved = 0
    for key, value in weights["true"].items():
        torch.testing.assert_close(value, weights["false"][key], rtol=1e-4, atol=1e-5, msg=key)
        moved += 1
    assert moved > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend,scope", [("fsdp2", "block"), ("ddp", "pass")])
def test_compiled_model_trains_like_eager(train_shards, tmp_path, backend, scope):
    """parallel.compile=true on 2 ranks gives the eager losses: every block compiled under FSDP2
    (dynamo + AOT autograd, through the packed / CLS-only / teacher-column calls), or every entry
    point one graph under DDP (compile_scope=pass). aot_eager keeps CI fast; the GPU runs in
    docs/benchmarks.md used inductor."""
    losses = {}
    for compiled in ("false", "true"):
        run = tmp_path / compiled
        out = finish(torchrun(common(train_shards, 2) + ["--run-dir", str(run), f"parallel.compile={compiled}",
                                                         f"parallel.backend={backend}", f"parallel.compile_scope={scope}",
                                                         "parallel.compile_backend=aot_eager"], free_port()))
        losses[compiled] = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
        assert len(losses[compiled]) == 2, out
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_the_teacher_is_built_after_the_student_is_sharded_and_starts_equal_to_it(train_shards, tmp_path,
                                                                                  monkeypatch):
    """One full model per rank at a time: the trainer shards the student before it builds the
    teacher (observed through the real build_backend), and the teacher then equals the student in
    every parameter (one rank, FSDP2)."""
    from torch.distributed.tensor import DTensor

    import tgdp.trainer as trainer_module
    from tgdp import parallel as P
    from tgdp.train import parse_args

    cfg = parse_args([*common(train_shards, 2), "--run-dir", str(tmp_path / "run"), "parallel.backend=fsdp2",
                      "device=cpu", "data.num_workers=0"])
    build_backend, sharded_first = trainer_module.build_backend, []

    def observed(cfg_, env, student, make_teacher, *args, **kwargs):
        def teacher():
            sharded_first.append(isinstance(next(student.parameters()), DTensor))
            return make_teacher()
        return build_backend(cfg_, env, student, teacher, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_backend", observed)
    trainer = trainer_module.Trainer(cfg)
    try:
        assert sharded_first == [True]
        student, teacher = (P.gather_full_state_dict(m) for m in (trainer.task.student, trainer.task.teacher))
        assert student.keys() == teacher.keys() and student
        for key in student:
            assert torch.equal(student[key], teacher[key]), key
    finally:
        trainer.close()
