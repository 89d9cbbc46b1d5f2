"""End to end: a tiny model pretrained on the synthetic corpus retrieves far above chance, an untrained
one does not; periodic eval inside training logs the same numbers; 2 gloo ranks == 1 process.

Margin (stated, asserted): 300 steps of the tiny preset on the 12-clip corpus, evaluated on the same
12 clips under the TG-DP protocol (16 pairs, diagonal mean). Chance: R@1 8.3 %, R@5 41.7 %, mean
rank 6.5. Measured when this test was written: trained R@1 25 / R@5 100 / mean rank 2.5 in both
directions; untrained (mean of 3 seeds) R@5 43 / mean rank 6.3. Asserted: trained R@5 >= 90 and
mean rank <= 3.5 in both directions; untrained R@5 <= 60 and mean rank >= 5 on average.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tgdp.eval.embed import EmbedConfig, Embeddings, extract
from tgdp.eval.encoder import EncoderConfig, load_encoder, recorded_model_config
from tgdp.eval.retrieval import retrieval_metrics
from tgdp.metrics import read_metrics

STEPS = 300
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[:4]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def retrieval_cli(*args: str, check: bool = True, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return run([*(launcher or [sys.executable]), "-m", "tgdp.eval.retrieval", *args, "data.num_workers=0"], check)


@pytest.fixture(scope="module")
def trained_run(corpus_shards, tmp_path_factory) -> Path:
    """The tiny preset trained for STEPS steps, with retrieval on the corpus every 150 steps."""
    run_dir = tmp_path_factory.mktemp("eval_run") / "run"
    run([sys.executable, "-m", "tgdp.train", "--config", "tiny", f"run_dir={run_dir}", f"data.shards={corpus_shards}",
         f"total_steps={STEPS}", "logging.wandb=false", "logging.image_every=0", "checkpoint.every_steps=0",
         "parallel.backend=none", f"eval.shards={corpus_shards}", "eval.every_steps=150"])
    return run_dir


@pytest.fixture(scope="module")
def standalone(trained_run, corpus_shards) -> dict:
    out = trained_run / "eval_1proc"
    retrieval_cli("--checkpoint", str(trained_run), "--shards", str(corpus_shards), "--output", str(out),
                  "save_embeddings=true", "examples=3")
    return json.loads((out / "retrieval.json").read_text())


def test_trained_model_far_above_chance_untrained_is_not(standalone, trained_run, corpus_shards):
    res = standalone
    assert res["clips"] == 12 and res["checkpoint"]["step"] == STEPS and res["checkpoint"]["weights"] == "student"
    assert res["chance"]["R@5"] == pytest.approx(100 * 5 / 12) and res["chance"]["MR"] == 6.5
    for direction in ("audio->video", "video->audio"):
        assert res[direction]["R@5"] >= 90.0, res[direction]
        assert res[direction]["MnR"] <= 3.5, res[direction]
    assert set(res["plots"]) == {"recall_curves", "examples_a2v", "examples_v2a"}
    assert res["output"] == str(trained_run / "eval_1proc")  # tgdp.quickstart reads it from the JSON
    assert all(Path(p).stat().st_size > 1000 for p in res["plots"].values())

    model_cfg, _ = recorded_model_config(trained_run)
    # the JSON records the geometry the run was trained with, not the eval preset's ViT-B
    assert res["config"]["model"] == dataclasses.asdict(model_cfg) and res["config"]["model"]["embed_dim"] != 768
    data = EmbedConfig(shards=str(corpus_shards), num_workers=0)
    r5, mnr = [], []
    for seed in range(3):  # untrained encoders of the same geometry
        enc = load_encoder(EncoderConfig(checkpoint="random", seed=seed), model_cfg)
        metrics, _ = retrieval_metrics(extract(enc.model, data, model_cfg.audio_frames, model_cfg.image_size))
        r5 += [m["R@5"] for m in metrics.values()]
        mnr += [m["MnR"] for m in metrics.values()]
    assert sum(r5) / len(r5) <= 60.0 and sum(mnr) / len(mnr) >= 5.0, (r5, mnr)


def test_periodic_eval_in_training_logs_the_standalone_numbers(trained_run, standalone):
    rows = {r["step"]: r for r in read_metrics(trained_run / "metrics.jsonl")}
    assert "eval/a2v_R@1" in rows[150] and "eval/v2a_MR" in rows[STEPS] and rows[STEPS]["eval/clips"] == 12
    for short, direction in (("a2v", "audio->video"), ("v2a", "video->audio")):
        for name in ("R@1", "R@5", "R@10", "MR"):
            assert rows[STEPS][f"eval/{short}_{name}"] == pytest.approx(standalone[direction][name])


def test_official_layout_export_gives_the_same_embeddings(trained_run, standalone, corpus_shards, tmp_path):
    from tgdp.models.interop import save_official

    cached = Embeddings.load(standalone["embeddings"])
    ours = load_encoder(EncoderConfig(checkpoint=str(trained_run)), None)  # geometry from the run's config
    path = save_official(ours.model, tmp_path / "official.pth")  # `module.`-prefixed, like the releases
    official = load_encoder(EncoderConfig(checkpoint=str(path)), ours.model_cfg)
    assert official.info["kind"] == "official checkpoint"
    emb = extract(official.model, EmbedConfig(shards=str(corpus_shards), num_workers=0),
                  ours.model_cfg.audio_frames, ours.model_cfg.image_size)
    assert emb.keys == cached.keys and torch.allclose(emb.audio, cached.audio, atol=1e-5)


def test_two_gloo_ranks_equal_one_process(trained_run, standalone, corpus_shards):
    out = trained_run / "eval_2ranks"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    retrieval_cli("--checkpoint", str(trained_run), "--shards", str(corpus_shards), "--output", str(out),
                  "save_embeddings=true", "plots=false", "device=cpu", launcher=torchrun)
    two = json.loads((out / "retrieval.json").read_text())
    one, two_emb = Embeddings.load(standalone["embeddings"]), Embeddings.load(two["embeddings"])
    assert two["embedding"]["world_size"] == 2 and two_emb.keys == one.keys and two_emb.labels == one.labels
    assert torch.allclose(two_emb.audio, one.audio, atol=1e-5) and torch.allclose(two_emb.video, one.video, atol=1e-5)
    for direction in ("audio->video", "video->audio"):
        assert two[direction] == standalone[direction]


def test_probe_cli_on_cached_embeddings(standalone, tmp_path):
    emb = standalone["embeddings"]
    proc = run([sys.executable, "-m", "tgdp.eval.probe", "--config", "vggsound", "--train", emb, "--test", emb,
                "--output", str(tmp_path), "epochs=3", "batch_size=4", "num_heads=4"])
    res = json.loads((tmp_path / "probe.json").read_text())
    assert res["task"] == "multiclass" and res["classes"] == 3 and 0.0 <= res["top1"] <= 100.0
    assert res["config"]["model"] is None  # features read from files: no model was built
    assert "top1" in proc.stdout


def test_errors_name_the_bad_path_and_field(corpus_shards, tmp_path, capsys):
    from tgdp.eval.retrieval import main

    for args, needle in ((["--checkpoint", "random", "--shards", str(tmp_path / "nope")], str(tmp_path / "nope")),
                         (["--checkpoint", str(tmp_path / "missing.pth"), "--shards", str(corpus_shards)],
                          "missing.pth"),
                         (["--checkpoint", "random", "--shards", str(corpus_shards), "ties=random"], "ties"),
                         (["--checkpoint", "random", "--shards", str(corpus_shards), "data.protocl=x"], "protocl")):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_cavmae_protocol_uses_the_centre_frame_whole_audio_and_mean_pooling(corpus_shards):
    from tgdp.data import sampling as S
    from tgdp.data.transforms import SampleDecoder
    from tgdp.eval.embed import data_config
    from tgdp.models.config import ModelConfig

    cfg = ModelConfig(embed_dim=32, depth=2, modality_specific_depth=1, num_heads=4, num_register_tokens=0,
                      cls_token=False, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4,
                      audio_frames=1024, image_size=64)  # CAV-MAE geometry, narrow
    enc = load_encoder(EncoderConfig(checkpoint="random"), cfg)
    data = EmbedConfig(shards=str(corpus_shards), protocol="cavmae", num_workers=0, max_clips=3)
    emb = extract(enc.model, data, cfg.audio_frames, cfg.image_size)
    assert emb.audio.shape == (3, 1, 32) and emb.meta["feature"] == "mean" and len(emb.keys) == 3
    # by hand: the first clip of the first shard, the frame nearest its centre and all 1024 fbank rows,
    # mean of the tokens. 16 frames at int(linspace(0, 249, 16)) / 25 s; the 998-row fbank spans
    # 9.995 s: frame 8 (5.28 s) is nearer its centre (4.9975 s) than frame 7 (4.64 s).
    loader_cfg = data_config(data, cfg.audio_frames, cfg.image_size)
    assert loader_cfg.split == "eval" and loader_cfg.eval_frame == -1
    shard = S.load_shard_set(str(corpus_shards))[0]
    raw = next(S.read_shard(shard.url, shard.samples, S.StreamStats(S.WorkerResume())))
    sample = SampleDecoder(loader_cfg, None)(raw, None)
    assert sample.frame_index == 8 and sample.audio.shape == (1024, 128)
    with torch.no_grad():
        out = enc.model.forward_features(torch.from_numpy(sample.audio)[None], sample.frames[None])
    assert emb.keys[0] == raw["__key__"]
    assert torch.allclose(emb.audio[0, 0], out.local_a.mean(1)[0], atol=1e-5)
    assert torch.allclose(emb.video[0, 0], out.local_v.mean(1)[0], atol=1e-5)


def test_probe_from_shard_folders_extracts_and_caches(trained_run, corpus_shards, tmp_path):
    from tgdp.eval.probe import ProbeConfig, run_probe
    from tgdp.parallel import destroy_distributed

    cfg = ProbeConfig(train=str(corpus_shards), test=str(corpus_shards), output=str(tmp_path), head="linear",
                      epochs=2, batch_size=4, encoder=EncoderConfig(checkpoint=str(trained_run)),
                      data=EmbedConfig(num_workers=0), device="cpu")
    try:
        res = run_probe(cfg)
    finally:
        destroy_distributed()
    cached = Embeddings.load(tmp_path / "train_embeddings.safetensors")
    assert cached.audio.shape == (12, 16, 64) and cached.meta["checkpoint"]["step"] == STEPS
    assert res["task"] == "multiclass" and res["checkpoint"]["step"] == STEPS
    assert json.loads((tmp_path / "probe.json").read_text())["top1"] == res["top1"]


def test_dcp_checkpoint_without_export_loads_the_same_weights(trained_run, tmp_path):
    import shutil

    step = next((trained_run / "checkpoints").glob("step_*"))
    copy = tmp_path / "run" / "checkpoints" / step.name
    shutil.copytree(step, copy)
    (copy / "model.safetensors").unlink()  # a checkpoint saved with checkpoint.export_safetensors=false
    manifest = json.loads((copy / "COMPLETE").read_text())
    del manifest["files"]["model.safetensors"]
    (copy / "COMPLETE").write_text(json.dumps(manifest))
    for weights in ("student", "teacher"):
        dcp = load_encoder(EncoderConfig(checkpoint=str(copy), weights=weights), None)
        export = load_encoder(EncoderConfig(checkpoint=str(step), weights=weights), None)
        assert dcp.info["kind"] == "dcp checkpoint" and export.info["kind"] == "tgdp consolidated export"
        a, b = dcp.model.state_dict(), export.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    student = load_encoder(EncoderConfig(checkpoint=str(step)), None).model
    assert not torch.equal(dcp.model.cls_token_a, student.cls_token_a)  # the EMA teacher differs from the student
