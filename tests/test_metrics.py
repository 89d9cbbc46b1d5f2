"""Throughput / MFU arithmetic, peak FLOPs, secret scrubbing and the metric logger (wandb offline)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from tgdp.config import ConfigError
from tgdp.metrics import (LoggingConfig, MetricLogger, Throughput, memory_metrics, mfu_pct, peak_flops, read_metrics,
                          table_peak_flops)
from tgdp.redact import scrub_secrets, secret_env_values

FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a wandb API key (40 hex)
FAKE_HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


class FakeClock:
    """A clock the test moves by hand, so timing arithmetic is checked exactly."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TTYStringIO(io.StringIO):
    def isatty(self) -> bool:  # a terminal: the logger draws a tqdm bar
        return True


class FakeLoader:
    """Yields `n` batches; each `next` takes `delay` seconds of the fake clock."""

    def __init__(self, clock: FakeClock, n: int, delay: float) -> None:
        self.clock, self.n, self.delay = clock, n, delay

    def __iter__(self):
        for i in range(self.n):
            self.clock.now += self.delay
            yield i


def test_mfu_arithmetic_on_known_numbers():
    # 0.58 TFLOP/sample (the TG-DP step's cost at ViT-B) at 200 samples/s on an A100 (312 TFLOP/s)
    assert mfu_pct(0.58e12, 200.0, 312e12) == pytest.approx(100 * 0.58e12 * 200 / 312e12)
    assert mfu_pct(1e12, 100.0, 200e12) == pytest.approx(50.0)


def test_throughput_window_with_injected_clock():
    clock = FakeClock()
    tp = Throughput(flops_per_sample=1e12, peak_flops_per_s=32e12, world_size=4, clock=clock)
    for batch in tp.timed(FakeLoader(clock, n=2, delay=0.25)):  # 0.25 s waiting for each batch
        clock.now += 0.75  # compute
        tp.step_done(8)
    m = tp.summary()
    assert m["perf/step_time_s"] == pytest.approx(1.0)
    assert m["perf/data_wait_s"] == pytest.approx(0.25)
    assert m["perf/data_wait_pct"] == pytest.approx(25.0)
    assert m["perf/samples_per_s_per_device"] == pytest.approx(8.0)
    assert m["perf/samples_per_s"] == pytest.approx(32.0)
    assert m["perf/tflops_per_s_per_device"] == pytest.approx(8.0)
    assert m["perf/mfu_pct"] == pytest.approx(25.0)
    assert tp.summary() == {}  # a new window, no step yet

    # per-step FLOPs (a scheduled mask ratio) and the context-manager form
    with tp.data_wait():
        clock.now += 1.0
    clock.now += 1.0
    tp.step_done(4, flops_per_sample=2e12)
    m = tp.summary()
    assert m["perf/data_wait_pct"] == pytest.approx(50.0)
    assert m["perf/mfu_pct"] == pytest.approx(100 * 4 * 2e12 / 2.0 / 32e12)


def test_peak_flops_table_and_cpu_measurement():
    expected = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
                "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA H200": 989e12,
                "NVIDIA GH200 480GB": 989e12, "NVIDIA H20": 148e12, "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12,
                "NVIDIA L4": 121e12, "NVIDIA A10": 125e12}
    for name, flops in expected.items():
        assert table_peak_flops(name)[0] == flops, name
    assert table_peak_flops("NVIDIA A10G") is None  # unknown parts are measured, not guessed
    flops, source = peak_flops("cpu", cpu_size=128)
    assert flops > 0 and source.startswith("measured")
    assert peak_flops("cpu", override=5e12) == (5e12, "config override")


def test_memory_metrics_cpu():
    m = memory_metrics("cpu")
    assert 0 < m["mem/peak_gib"] < 1024


def test_logging_config_validate():
    LoggingConfig().validate()
    for bad in (dict(log_every=0), dict(image_every=-1), dict(project=""), dict(project="a/b"),
                dict(peak_tflops=0.0)):
        with pytest.raises(ConfigError):
            LoggingConfig(**bad).validate()


@dataclasses.dataclass
class _Sub:
    api_key: str = FAKE_WANDB_KEY
    lr: float = 1e-4


def test_scrub_secrets():
    cfg = {
        "WANDB_API_KEY": FAKE_WANDB_KEY,
        "hf_token": FAKE_HF_TOKEN,
        "db": {"password": 123456, "user": "me", "url": "https://me:hunter2@example.com/x"},
        "notes": f"key is {FAKE_WANDB_KEY}",
        "list": ["ok", FAKE_HF_TOKEN, ("x", 1)],
        "sub": _Sub(),
        "model": {"cls_token": True, "num_register_tokens": 8, "embed_dim": 768},  # not secrets
        "run_name": "tgdp_base_20261125_lr1e-4_bs48",
        "data": {"shards": "/data/as2m/shard-{000000..000099}.tar", "hf_token": None},
        "custom": "s3cr3t-value-from-env",
    }
    out = scrub_secrets(cfg, extra_secrets=["s3cr3t-value-from-env"])
    assert out["WANDB_API_KEY"] == out["hf_token"] == out["db"]["password"] == out["db"]["url"] == "***"
    assert out["notes"] == out["list"][1] == out["sub"]["api_key"] == out["custom"] == "***"
    assert out["db"]["user"] == "me" and out["list"][0] == "ok" and out["list"][2] == ("x", 1)
    assert out["sub"]["lr"] == 1e-4
    assert out["model"] == cfg["model"]
    assert out["run_name"] == cfg["run_name"] and out["data"] == cfg["data"]
    assert cfg["WANDB_API_KEY"] == FAKE_WANDB_KEY  # the input is not modified
    assert FAKE_WANDB_KEY not in json.dumps(out) and FAKE_HF_TOKEN not in json.dumps(out)
    env = {"WANDB_API_KEY": "abc123456789", "HF_TOKEN": "tok-123456789", "PWD": "/work/main", "HOME": "/root"}
    assert sorted(secret_env_values(env)) == ["abc123456789", "tok-123456789"]


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_metric_logger_offline_wandb_jsonl_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)  # wandb itself sees it too: it must not log it
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setenv("WANDB_MODE", "offline")
    console = TTYStringIO()
    config = {"model": {"embed_dim": 768}, "wandb_api_key": FAKE_WANDB_KEY, "notes": f"token {FAKE_HF_TOKEN}"}
    png = tmp_path / "pic.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(png)
    run_dir = tmp_path / "run"
    with MetricLogger(LoggingConfig(log_every=1), run_dir, run_name="test", config=config, total_steps=3,
                      console_file=console) as logger:
        run_id = logger.run_id
        assert run_id and logger.wandb_id == run_id
        for step in (1, 2, 3):
            logger.log(step, {"loss/total": torch.tensor(1.0 / step), "perf/samples_per_s": 10.0 * step,
                              "comment": f"see {FAKE_WANDB_KEY}"})
        logger.log_images(3, {"recon": png})

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss/total"] for r in rows] == pytest.approx([1.0, 0.5, 1 / 3])
    assert rows[-1]["images"] == {"recon": str(png)} and rows[0]["comment"] == "***"
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["run_id"] == run_id and start["config"]["model"]["embed_dim"] == 768
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "loss" in console.getvalue()
    everything = _all_bytes(run_dir) + console.getvalue().encode()
    for secret in (FAKE_WANDB_KEY, FAKE_HF_TOKEN):
        assert secret.encode() not in everything

    # a resumed job (same logical run id, from a checkpoint at step 2): a new offline segment, and
    # read_metrics forgets what the first job logged after step 2
    with MetricLogger(LoggingConfig(console=False), run_dir, run_id=run_id, start_step=2) as logger:
        assert logger.wandb_id == f"{run_id}-seg1"
        logger.log(3, {"loss/total": 0.25})
        logger.log(4, {"loss/total": 0.2})
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss/total"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.2)]
    assert "images" not in rows[2]


def test_metric_logger_without_wandb_and_on_other_ranks(tmp_path):
    env = {"WANDB_MODE": "offline"}
    log_file = io.StringIO()  # not a terminal (a Slurm log): one line per record, no bar
    with MetricLogger(LoggingConfig(wandb=False), tmp_path / "a", env=env, total_steps=10,
                      console_file=log_file) as logger:
        logger.log(0, {"loss": 2.0})
    assert log_file.getvalue().endswith("step 0/10 loss=2\n")
    assert not (tmp_path / "a" / "wandb").exists()
    assert read_metrics(tmp_path / "a" / "metrics.jsonl")[0]["loss"] == 2.0

    with MetricLogger(LoggingConfig(), tmp_path / "b", rank=1, env=env) as logger:
        logger.log(0, {"loss": 2.0})
        logger.log_images(0, {})
    assert not (tmp_path / "b").exists() and logger.run_id is None

    with pytest.raises(ConfigError, match="WANDB_MODE"):
        MetricLogger(LoggingConfig(), tmp_path / "c", env={"WANDB_MODE": "onlin"})
    assert not (tmp_path / "c").exists()
