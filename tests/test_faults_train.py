"""Fault injection into real training runs (torchrun, 2 gloo FSDP2 ranks, real shards and files):
a rank SIGKILLed mid-checkpoint, a rank that stops answering or dies mid-step, three stop signals
in one run, damaged and vanishing shards, a full disk while checkpointing. Each run is compared
with an uninterrupted one where that is the claim. docs/reliability.md maps every fault to its
test."""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest

from tests.fault_tools import (
    assert_no_process_left,
    fill_disk,
    finish,
    logged_step,
    process_env,
    rank_pids,
    small_disk,
    start_one_process,
    tagged_env,
    torchrun,
    train_one_process,
    wait_gone,
    wait_until,
)
from tests.shard_factory import make_shards
from tests.test_train import _children, assert_same_weights
from tgdp.checkpoint import find_latest_complete, incompleteness
from tgdp.data import sampling as S
from tgdp.metrics import read_metrics

STEPS = 24
EVERY = 8  # periodic checkpoints at 8, 16, 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 shards x 8 clean samples with realistic JPEG frames (factory-made: no video decoding)."""
    root = tmp_path_factory.mktemp("fault_shards")
    make_shards(root, num_shards=8, samples_per_shard=8, frame_wh=(80, 64), rows=160, fbank="random", texture=True)
    return root


def args(shards: Path, run_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--config", "tiny", "--shards", str(shards), "--steps", str(steps), "--run-dir", str(run_dir),
            "logging.wandb=false", "logging.log_every=1", "logging.image_every=0", "data.batch_size=4",
            f"checkpoint.every_steps={EVERY}", *extra]


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run every interrupted one must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = torchrun(args(shards, run))
    out = finish(proc)
    assert proc.returncode == 0 and (run / "export" / "model.safetensors").is_file(), out
    return run


def losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["loss/distill"]) for r in read_metrics(run / "metrics.jsonl")]


def assert_same_run(a: Path, b: Path, steps: int = STEPS) -> None:
    """Same final student + teacher weights (bitwise) and the same logged losses at every step."""
    assert_same_weights(a / "export" / "model.safetensors", b / "export" / "model.safetensors")
    assert losses(a) == losses(b) and len(losses(a)) == steps


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_rank_sigkilled_mid_checkpoint_resumes_from_newest_complete(shards, straight, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(args(shards, run), script="tests/kill_in_save.py",
                    env=process_env(TGDP_KILL_IN_SAVE=f"1:{2 * EVERY}"))
    out = finish(proc)
    assert proc.returncode != 0, out
    root = run / "checkpoints"
    broken = root / f"step_{2 * EVERY:08d}.tmp"
    # rank 0 wrote its part, rank 1 died after its DCP shard and before its rank file: mid-write
    assert (broken / "rank_0.json").is_file() and not (broken / "rank_1.json").exists(), sorted(os.listdir(broken))
    assert sorted(p.name for p in root.iterdir()) == [f"step_{EVERY:08d}", broken.name]
    assert incompleteness(root / f"step_{EVERY:08d}") is None

    proc = torchrun(args(shards, run))
    out = finish(proc)
    assert proc.returncode == 0, out
    assert f"ignoring checkpoint folder {broken}: an unfinished save" in out  # reported, not loaded
    assert f"resumed from {root / f'step_{EVERY:08d}'} at step {EVERY}" in out
    assert_same_run(straight, run)
    assert find_latest_complete(root) == root / f"step_{STEPS:08d}" and not broken.exists()


@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL], ids=["sigstop", "sigkill"])
def test_a_rank_that_stops_answering_or_dies_mid_step_ends_every_rank_within_the_timeout(shards, tmp_path, how):
    """Rank 1 is frozen (SIGSTOP: a hung host) or killed in the middle of a step: rank 0 leaves its
    collective within parallel.timeout_s and exits naming rank 1, the launcher exits non-zero, and
    no process of the run (ranks, forkservers, resource trackers, decoders) stays behind."""
    timeout, run, tag = 15, tmp_path / "run", f"peer-{how.name}-{os.getpid()}"
    proc = torchrun(args(shards, run, f"parallel.timeout_s={timeout}", "data.wait_timeout_s=14", steps=500),
                    env=tagged_env(tag))
    try:
        wait_until(lambda: logged_step(run) >= 3, proc, "step 3")
        ranks = rank_pids(proc.pid)
        os.kill(ranks[1], how)
        rank0_exit = wait_gone(ranks[0], timeout + 60)  # the bound plus the naming (a few heartbeats) and a slow CPU
        out = finish(proc, timeout=120)  # torchrun then ends rank 1 (SIGTERM, after 30 s SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rank0_exit is not None, "rank 0 still waits for the lost rank"
    assert proc.returncode != 0, out
    assert "rank 0: rank 1 stopped answering (" in out and "a collective failed (" in out, out[-4000:]
    assert "exitcode  : 6" in out, out[-3000:]  # EXIT_PEER_LOST from rank 0
    assert_no_process_left(tag)


def _segments(folder: Path, rank: int) -> list[dict]:
    path = folder / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ended(folder: Path, segment: int) -> bool:
    return all(any(r["segment"] == segment and "code" in r for r in _segments(folder, rank)) for rank in (0, 1))


@pytest.mark.timeout(600)
def test_job_wide_sigterm_at_twenty_random_moments_resumes_bitwise(shards, tmp_path):
    """SIGTERM to every process of both ranks (what scancel, preemption and torchrun's forwarding
    deliver: each rank's process group, so its decoders, forkserver and resource tracker too), 20
    times at random moments: half anywhere in a segment (model build, resume, decoder start-up, a
    rank waiting for its first batch, the loop), half inside the loop's steps. Every time both ranks
    write the stop checkpoint and return 0, no decoder dies of it, and the run, resumed 20 times,
    equals an uninterrupted one bitwise. The segments run one after another in the same rank
    processes (tests/stop_drills.py), each one an unmodified tgdp.train.main."""
    seed = int(os.environ.get("TGDP_FAULT_SEED", random.SystemRandom().randrange(1 << 30)))
    # A drill anywhere in a segment may let it train up to ~15 steps (3 s); the steps are many
    # enough that the run never finishes before its 20th drill.
    rng, drills, steps = random.Random(seed), 20, 160
    context = f"TGDP_FAULT_SEED={seed}"
    reference = tmp_path / "reference"
    proc = torchrun(args(shards, reference, steps=steps))
    out = finish(proc)
    assert proc.returncode == 0, out
    step_time = statistics.median(r["perf/step_time_s"] for r in read_metrics(reference / "metrics.jsonl"))

    run, segments, tag = tmp_path / "run", tmp_path / "segments", f"drills-{os.getpid()}"
    segments.mkdir()
    proc = torchrun(args(shards, run, steps=steps), script="tests/stop_drills.py",
                    env=tagged_env(tag, TGDP_SEGMENTS=str(segments)))
    try:
        for drill in range(drills):
            where = f"{context}: drill {drill}"
            if drill % 2 == 0:  # anywhere in the segment, from its start
                wait_until(lambda: all(_segments(segments, r) and _segments(segments, r)[-1]["segment"] == drill
                                       for r in (0, 1)), proc, f"segment {drill} starts ({where})")
                time.sleep(rng.uniform(0, 3.0))
            else:  # inside the loop: once the segment trained a step
                resumed = logged_step(run)
                wait_until(lambda: logged_step(run) > resumed, proc, f"a step of segment {drill} ({where})")
                time.sleep(rng.uniform(0, 2 * step_time))
            for pid in rank_pids(proc.pid).values():
                os.killpg(pid, signal.SIGTERM)  # the rank and every process it started
            wait_until(lambda: _ended(segments, drill), proc, f"segment {drill} ends ({where})", timeout=120)
            for rank in (0, 1):
                end = next(r for r in _segments(segments, rank) if r["segment"] == drill and "code" in r)
                assert end == {"segment": drill, "code": 0, "signal": "SIGTERM"}, (where, rank, end)
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{context}\n{out[-4000:]}"
    for rank in (0, 1):  # 20 stopped segments, then one that finished
        assert _segments(segments, rank)[-1] == {"segment": drills, "code": 0, "signal": ""}, (context, rank)
    assert out.count("stopped at step") == 2 * drills, f"{context}\n{out[-4000:]}"
    assert "exited unexpectedly" not in out and "Traceback" not in out and "resource_tracker" not in out, out[-4000:]
    assert_same_run(reference, run, steps)
    assert_no_process_left(tag)


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_three_stop_signals_at_random_steps_match_uninterrupted(shards, straight, tmp_path):
    """Slurm's SIGUSR1 warning, sent to the launcher as Slurm does (torchrun forwards it to each
    rank's whole process group, data-loader processes included), and SIGTERM preemption delivered
    to the ranks, at random steps; the stopped-and-resumed run equals the uninterrupted one."""
    seed = int(os.environ.get("TGDP_FAULT_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(2, STEPS - 8), 3))
    kinds = [signal.SIGUSR1, signal.SIGTERM, rng.choice([signal.SIGUSR1, signal.SIGTERM])]
    context = f"TGDP_FAULT_SEED={seed}: signals {[k.name for k in kinds]} after steps {thresholds}"
    run = tmp_path / "run"
    stopped = 0
    for kind, threshold in zip(kinds, thresholds):
        proc = torchrun(args(shards, run))
        target = max(threshold, stopped + 1)
        wait_until(lambda: logged_step(run) >= target, proc, f"step {target} ({context})")
        for pid in [proc.pid] if kind == signal.SIGUSR1 else _children(proc.pid):
            os.kill(pid, kind)
        out = finish(proc)
        line = next((ln for ln in out.splitlines() if "stopped at step" in ln), None)
        assert line is not None and f"by {kind.name}" in line, f"{context}\n{out}"
        step = int(line.split("stopped at step ")[1].split()[0])
        assert stopped < step < STEPS and (run / "checkpoints" / f"step_{step:08d}").is_dir(), context
        assert "exited unexpectedly" not in out and "resource_tracker" not in out, f"{context}\n{out}"
        stopped = step
    proc = torchrun(args(shards, run))
    out = finish(proc)
    assert proc.returncode == 0 and "resumed from" in out, f"{context}\n{out}"
    assert_same_run(straight, run)


def test_damaged_and_vanishing_shards_are_skipped_counted_logged_and_training_goes_on(tmp_path):
    """A corrupt JPEG, a NaN fbank, a wrong-shape fbank, a truncated tar, an empty shard and a
    shard deleted while the epoch is running: every one skipped, counted, logged with shard (and
    key); every step trains."""
    num_shards, per_shard = 8, 8
    # The order the single epoch-mode stream reads the shards in (a pure function of the seed), so
    # the damage is read early and the deleted shard is the last one of the pass.
    order = [int(e.url) for e in S.epoch_shard_slice([S.ShardEntry(str(i), per_shard) for i in range(num_shards)],
                                                     seed=0, epoch=0, rank=0, worker=0, world_size=1, streams=1)]
    kinds = ("bad_jpeg", "fbank_nan", "fbank_shape")
    bad_samples = {order[i] * per_shard + 3: kind for i, kind in enumerate(kinds)}
    truncated, empty, doomed_index = order[3], order[4], order[-1]
    root = tmp_path / "shards"
    make_shards(root, num_shards=num_shards, samples_per_shard=per_shard, corrupt=bad_samples,
                truncate={truncated: 0.5}, empty={empty})
    doomed = root / f"shard-{doomed_index:06d}.tar"
    run = tmp_path / "run"
    steps = 20  # > one pass over the 8 shards (about 13 batches of 4)
    cmd = args(root, run, "parallel.backend=none", "checkpoint.every_steps=0", "data.mode=epoch",
               "data.shuffle_buffer=0", "data.prefetch_factor=1", steps=steps)
    proc = start_one_process(cmd)
    wait_until(lambda: logged_step(run) >= 1, proc, "the first step")
    doomed.unlink()
    out = finish(proc)
    assert proc.returncode == 0, out
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["train/step_applied"] == 1.0 for r in records)
    for index in bad_samples:
        key, shard = f"s{index // per_shard:03d}_{index % per_shard:05d}", f"shard-{index // per_shard:06d}.tar"
        assert any(f"skipped corrupt sample key={key} shard=" in ln and shard in ln for ln in out.splitlines()), key
    problems = [ln for ln in out.splitlines() if "shard problem shard=" in ln]
    assert any(f"shard-{truncated:06d}.tar" in ln and "unreadable after" in ln for ln in problems), problems
    assert any(f"shard-{empty:06d}.tar" in ln and "empty shard" in ln for ln in problems), problems
    assert any(doomed.name in ln and "No such file" in ln for ln in problems), problems  # deleted mid-epoch
    last = records[-1]
    assert last["data/skipped"] >= len(bad_samples) + 1  # + the sample cut in half by the truncation
    assert last["data/shard_errors"] >= 3 and last["data/shard_errors"] == len(problems)


def test_disk_full_while_checkpointing_stops_cleanly_and_keeps_the_previous_one(shards, tmp_path):
    with small_disk(tmp_path / "disk", megabytes=48) as disk:
        run = disk / "run"
        every, steps = 5, 15
        cmd = args(shards, run, "parallel.backend=none", f"checkpoint.every_steps={every}", "logging.log_every=100",
                   steps=steps)
        proc = start_one_process(cmd)
        first = run / "checkpoints" / f"step_{every:08d}"
        wait_until(lambda: incompleteness(first) is None, proc, "the first checkpoint is complete")
        filler = fill_disk(disk)  # the next write is the step-10 checkpoint (no metrics until the end)
        out = finish(proc)
        assert proc.returncode == 4, out
        assert f"saving checkpoint step {2 * every} failed" in out and "No space left on device" in out, out
        assert f"the newest complete checkpoint {first} is intact" in out and "re-run the same command" in out
        assert "Traceback" not in out, out
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first.name]  # no half-written folder
        assert incompleteness(first) is None

        filler.unlink()  # space freed: the same command resumes from the intact checkpoint
        done = train_one_process(cmd)
        assert done.returncode == 0, done.stderr
        assert f"resumed from {first} at step {every}" in done.stderr
        assert logged_step(run) == steps
