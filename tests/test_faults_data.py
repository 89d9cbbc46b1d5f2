"""Fault injection into the data side with real processes: Slurm's SIGUSR1 reaching the loader's
decoder processes (as torchrun's and Slurm's do), a disk that fills up while make_shards
writes, and a training run over hundreds of damaged shards. docs/reliability.md maps every fault
to its test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap

from tests.conftest import REPO, run_tool
from tests.fault_tools import (
    assert_no_process_left,
    fill_disk,
    finish,
    process_env,
    small_disk,
    tagged_env,
    torchrun,
    train_one_process,
    wait_until,
)
from tests.shard_factory import make_shards
from tests.tar_fuzz import SAMPLES_PER_SHARD, base_shards, damaged_shards, headers, write_shard_set
from tgdp.checkpoint import incompleteness
from tgdp.data import sampling as S
from tgdp.data.format import read_index
from tgdp.metrics import read_metrics

_LOADER_UNDER_SIGNALS = textwrap.dedent("""
    import signal, sys, time
    import torch
    from tgdp.data.config import DataConfig
    from tgdp.data.loader import ShardLoader

    got = []
    signal.signal(signal.SIGUSR1, lambda n, f: got.append(signal.Signals(n).name))  # StopRequested in miniature
    cfg = DataConfig(shards=sys.argv[1], batch_size=4, num_workers=1, prefetch_factor=1, frame_size=32,
                     full_frames=64, audio_frames=32, shuffle_buffer=16, shuffle_initial=4, seed=1)
    batches = iter(ShardLoader(cfg))
    first = next(batches)
    print("READY", flush=True)
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    rest = [next(batches) for _ in range(4)]  # more than the worker prefetched: it must still be alive
    reference = [b for _, b in zip(range(5), ShardLoader(cfg))]
    same = all(a["keys"] == b["keys"] and torch.equal(a["audio"], b["audio"]) for a, b in zip([first, *rest], reference))
    print("SIGNALS", sorted(got), "SAME", same, flush=True)
""")


def test_loader_workers_outlive_sigusr1_sent_to_the_whole_job(tmp_path):
    """torchrun forwards SIGUSR1 with killpg and Slurm signals every process of the job: the
    decoder processes get it too. They must leave it to the training process, which may still be
    waiting for a batch while it finishes its step; and the run must still exit."""
    make_shards(tmp_path / "shards", num_shards=4, samples_per_shard=8)
    proc = subprocess.Popen([sys.executable, "-c", _LOADER_UNDER_SIGNALS, str(tmp_path / "shards")], cwd=REPO,
                            env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as torchrun gives each worker
    lines: list[str] = []
    while not lines or lines[-1] != "READY\n":
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    os.killpg(proc.pid, signal.SIGUSR1)
    out = "".join(lines) + finish(proc, timeout=120)
    assert proc.returncode == 0, out
    assert "SIGNALS ['SIGUSR1'] SAME True" in out, out
    assert "exited unexpectedly" not in out and "resource_tracker" not in out, out


def test_make_shards_on_a_full_disk_keeps_finished_shards_and_resumes(tmp_path):
    from tgdp.data.synthetic import make_corpus

    manifest = make_corpus(tmp_path / "corpus", num_clips=6, num_classes=2, duration=2.0, seed=3, workers=1)
    command = ["--input", str(manifest), "--workers", "1", "max_samples_per_shard=1", "progress=false"]
    with small_disk(tmp_path / "disk", megabytes=8) as disk:
        out_dir = disk / "shards"
        proc = subprocess.Popen([sys.executable, str(REPO / "data_tools" / "make_shards.py"), *command,
                                 "--output", str(out_dir)], cwd=REPO, env=process_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: (out_dir / "shard-000000.tar").is_file(), proc, "the first shard is finished")
        filler = fill_disk(disk)
        out = finish(proc)
        assert proc.returncode == 1, out
        assert f"make_shards: error: writing under {out_dir} failed" in out and "No space left on device" in out
        assert "re-run the same command to resume" in out and "Traceback" not in out, out
        finished = {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.tar"))}
        assert 1 <= len(finished) < 6 and not list(out_dir.glob("*.tmp")), sorted(os.listdir(out_dir))
        for name in finished:  # complete tars, one whole sample each: nothing half-written under a final name
            with tarfile.open(out_dir / name) as tar:
                assert len(tar.getnames()) == 18, name

        filler.unlink()
        run_tool("make_shards.py", *command, "--output", out_dir)
        index = read_index(out_dir)
        assert index.total_samples == 6 and len(index.shards) == 6
        keys = [n.split(".")[0] for s in index.shards for n in tarfile.open(out_dir / s.name).getnames()]
        assert len(set(keys)) == 6  # every clip exactly once
        assert all((out_dir / name).read_bytes() == data for name, data in finished.items())


def _issue_shard() -> bytes:
    """The shard of the bug report: one damaged length digit in a PAX record (`00 comment=...`),
    which made the reader loop forever."""
    data = bytearray(base_shards()["pax_long"])
    at = next(at for at, kind, _ in headers(bytes(data)) if kind == b"x") + 512  # the first PAX payload
    digits = data.index(b" comment=", at)
    start = data.rfind(b"\n", at, digits) + 1 or at  # where that record's length begins
    data[start:digits] = b"0" * (digits - start)
    return bytes(data)


def test_training_streams_every_damaged_shard_and_counts_the_damage(tmp_path):
    """The 530 damaged shards of tests/tar_fuzz.py and the bug report's shard, one folder, one
    epoch-mode epoch of a real tiny-preset run (one process, one decoder process): the run ends,
    every step trains, and every shard the reader refuses or finds short is logged as a shard
    problem and counted; every skipped sample too."""
    root = tmp_path / "shards"
    paths = write_shard_set(root, [("issue-00-comment", _issue_shard()), *damaged_shards(seed=16)])
    damaged = set()  # what the reader says of each shard on its own
    for path in paths:
        stats = S.StreamStats(S.WorkerResume())
        for _ in S.read_shard(str(path), SAMPLES_PER_SHARD, stats):
            pass
        if stats.shard_errors:
            damaged.add(str(path))
    batch = 16
    steps = len(paths) * SAMPLES_PER_SHARD // batch  # one epoch: the stream reads every shard
    run = tmp_path / "run"
    proc = train_one_process(["--config", "tiny", "--shards", str(root), "--steps", str(steps), "--run-dir", str(run),
                              "logging.wandb=false", "logging.log_every=1", "logging.image_every=0",
                              "parallel.backend=none", "data.mode=epoch", "data.num_frames=2", "data.eval_frame=0",
                              f"data.batch_size={batch}", "checkpoint.every_steps=0", "export_on_finish=false"],
                             timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["train/step_applied"] == 1.0 for r in records)
    problems = re.findall(r"shard problem shard=(\S+?): ", out)
    assert set(problems) == damaged and str(root / "issue-00-comment.tar") in damaged
    assert len(damaged) >= 300, len(damaged)
    assert records[-1]["data/shard_errors"] == len(problems)
    assert records[-1]["data/skipped"] == out.count("skipped corrupt sample key=") > 0


def test_a_shard_whose_read_blocks_stops_every_rank_within_the_bound_naming_it(tmp_path):
    """Rank 1's decoder opens a shard that is a named pipe no one writes (as a hung file system
    would block it): rank 1 gives up after data.wait_timeout_s, names the worker and the shard,
    every rank writes the stop checkpoint and exits 5, and no process of the run stays behind."""
    root = tmp_path / "shards"
    make_shards(root, num_shards=8, samples_per_shard=8)
    # epoch mode: each rank reads its own 4 shards; rank 1's last one blocks, a few steps in
    mine = S.epoch_shard_slice(S.load_shard_set(str(root)), seed=0, epoch=0, rank=1, worker=0, world_size=2,
                               streams=1)
    blocked = mine[-1].url
    os.unlink(blocked)
    os.mkfifo(blocked)
    run, tag, bound = tmp_path / "run", f"stall-{os.getpid()}", 30  # above a loaded CI's decoder start-up
    proc = torchrun(["--config", "tiny", "--shards", str(root), "--steps", "200", "--run-dir", str(run),
                     "logging.wandb=false", "logging.log_every=1", "logging.image_every=0", "data.batch_size=4",
                     "data.mode=epoch", "checkpoint.every_steps=0", f"data.wait_timeout_s={bound}"],
                    env=tagged_env(tag))
    out = finish(proc, timeout=bound + 240)
    assert proc.returncode != 0, out
    message = (rf"rank 1 waited \d+ s for a batch \(data.wait_timeout_s={bound}\): decoder worker 0 \(pid \d+\) "
               rf"is opening shard {re.escape(blocked)} \(before its first member\)")
    assert re.search(message, out), out[-4000:]
    assert "rank 0 waited" not in out  # rank 0 had its batches and stopped with rank 1
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and incompleteness(saved[0]) is None and saved[0].name != "step_00000000", out[-4000:]
    assert f"A checkpoint of step {int(saved[0].name[5:])} was written" in out
    assert out.count("exitcode  : 5") == 2, out[-3000:]  # torchrun's summary: EXIT_DATA_STALL on both ranks
    assert_no_process_left(tag)


def test_without_decoder_processes_a_blocked_read_ends_the_process_with_the_same_report(tmp_path):
    """data.num_workers=0: the training process reads the blocked shard itself and cannot give the
    read up; past data.wait_timeout_s it logs the same report and exits 5 (no checkpoint)."""
    root = tmp_path / "shards"
    make_shards(root, num_shards=4, samples_per_shard=8)
    order = S.epoch_shard_slice(S.load_shard_set(str(root)), seed=0, epoch=0, rank=0, worker=0, world_size=1,
                                streams=1)
    blocked = order[2].url  # a few steps in
    os.unlink(blocked)
    os.mkfifo(blocked)
    bound = 10
    proc = train_one_process(["--config", "tiny", "--shards", str(root), "--steps", "100", "--run-dir",
                              str(tmp_path / "run"), "logging.wandb=false", "logging.log_every=1",
                              "logging.image_every=0", "parallel.backend=none", "data.batch_size=4", "data.mode=epoch",
                              "data.num_workers=0", "checkpoint.every_steps=0", f"data.wait_timeout_s={bound}"],
                             timeout=bound + 240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 5, out[-3000:]
    assert re.search(rf"rank 0 waited \d+ s for a batch \(data.wait_timeout_s={bound}\): decoder worker 0 \(pid \d+\) "
                     rf"is opening shard {re.escape(blocked)}", out), out[-3000:]
    assert "cannot give up the read: exiting without a checkpoint" in out
