"""Pictures: exact panel arrays (mask layout = the model's patch layout) and valid, non-blank PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tgdp import visualize as V
from tgdp.models import patches as patch_ops

p = 4
T, F = 16, 8  # audio grid (F/p, T/p) = (2, 4): 8 patches
H = W = 12  # video grid (3, 3): 9 patches
GRID_A, GRID_V = (F // p, T // p), (H // p, W // p)


@pytest.fixture()
def inputs():
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(T, F, generator=g)
    frame = torch.randn(3, H, W, generator=g)
    mask_a = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0.0])  # 1 = removed
    mask_v = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 0.0])
    # predictions = the patches of OTHER known inputs, so the expected reconstruction is an image
    pred_audio = torch.randn(T, F, generator=g)
    pred_frame = torch.randn(3, H, W, generator=g)
    pred_a = patch_ops.patchify_audio(pred_audio[None], p)[0]  # [N_a, p*p]
    pred_v = patch_ops.patchify(pred_frame[None], p)[0]  # [N_v, p*p*3]
    return dict(audio=audio, frame=frame, mask_a=mask_a, mask_v=mask_v, pred_a=pred_a, pred_v=pred_v,
                pred_audio=pred_audio, pred_frame=pred_frame)


def removed_pixels(mask: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Pixel map of removed patches, by the model's token index = row * cols + col (written out by hand)."""
    out = np.zeros((grid[0] * p, grid[1] * p), dtype=bool)
    for idx in np.flatnonzero(mask.numpy() > 0.5):
        r, c = divmod(int(idx), grid[1])
        out[r * p:(r + 1) * p, c * p:(c + 1) * p] = True
    return out


def test_patch_layout_matches_the_model():
    img = torch.randn(2, 3, H, W)
    ours = np.stack([V.patchify(x.permute(1, 2, 0).numpy(), p) for x in img])
    np.testing.assert_allclose(ours, patch_ops.patchify(img, p).numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(V.unpatchify(ours[0], GRID_V, p), img[0].permute(1, 2, 0).numpy())


def test_reconstruction_panels_exact(inputs):
    x = inputs
    panels = V.reconstruction_panels(x["audio"], x["frame"], x["mask_a"], x["mask_v"], x["pred_a"], x["pred_v"], p,
                                     fbank_mean=-5.0, fbank_std=4.0)
    # audio: shown as [F, T] (rows = frequency), in fbank units
    hole_a = removed_pixels(x["mask_a"], GRID_A)
    audio_img = x["audio"].numpy().T * 4.0 - 5.0
    pred_img = x["pred_audio"].numpy().T * 4.0 - 5.0
    assert panels["audio_masked"].shape == (F, T)
    np.testing.assert_array_equal(np.isnan(panels["audio_masked"]), hole_a)  # blank exactly on removed patches
    np.testing.assert_allclose(panels["audio_masked"][~hole_a], audio_img[~hole_a], rtol=1e-6)
    np.testing.assert_allclose(panels["audio_input"], audio_img, rtol=1e-6)
    np.testing.assert_allclose(panels["audio_recon"], np.where(hole_a, pred_img, audio_img), rtol=1e-6, atol=1e-6)
    # video: [H, W, 3], de-normalised with the ImageNet statistics and clipped to [0, 1]
    hole_v = removed_pixels(x["mask_v"], GRID_V)
    mean, std = np.array(V.IMAGE_MEAN), np.array(V.IMAGE_STD)
    frame_img = np.clip(x["frame"].permute(1, 2, 0).numpy() * std + mean, 0, 1)
    pred_frame = np.clip(x["pred_frame"].permute(1, 2, 0).numpy() * std + mean, 0, 1)
    np.testing.assert_array_equal(np.isnan(panels["video_masked"]).all(-1), hole_v)
    np.testing.assert_array_equal(np.isnan(panels["video_masked"]).any(-1), hole_v)
    np.testing.assert_allclose(panels["video_masked"][~hole_v], frame_img[~hole_v], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(panels["video_recon"], np.where(hole_v[..., None], pred_frame, frame_img), atol=1e-6)


def test_norm_pix_predictions_are_unstandardised(inputs):
    x = inputs
    # a perfect norm-pix prediction
    target_a = patch_ops.normalize_patches(patch_ops.patchify_audio(x["audio"][None], p))[0]
    target_v = patch_ops.normalize_patches(patch_ops.patchify(x["frame"][None], p))[0]
    panels = V.reconstruction_panels(x["audio"], x["frame"], x["mask_a"], x["mask_v"], target_a, target_v, p,
                                     norm_pix=True)
    np.testing.assert_allclose(panels["audio_recon"], panels["audio_input"], atol=1e-4)
    np.testing.assert_allclose(panels["video_recon"], panels["video_input"], atol=1e-4)


def test_priority_panels_grey_out_dropped_patches(inputs):
    x = inputs
    kept_a, kept_v = 1 - x["mask_a"], 1 - x["mask_v"]
    scores_a, scores_v = torch.arange(8.0), torch.arange(9.0)
    panels = V.priority_panels(x["audio"], x["frame"], scores_a, scores_v, kept_a, kept_v, p)
    np.testing.assert_array_equal(np.isnan(panels["audio_kept"]), removed_pixels(x["mask_a"], GRID_A))
    np.testing.assert_array_equal(np.isnan(panels["video_kept"]).any(-1), removed_pixels(x["mask_v"], GRID_V))
    # patch (row 1, col 2) of the audio grid carries score 1 * 4 + 2 = 6, at frequency rows 4..7, time cols 8..11
    assert (panels["audio_scores"][4:8, 8:12] == 6).all()


def assert_png(path, min_std: float = 1.0):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.std() > min_std  # not a blank canvas
    assert not list(path.parent.glob(".*.tmp-*"))  # the atomic write left nothing behind


def test_every_plot_writes_a_png(tmp_path, inputs):
    x = inputs
    out = V.plot_reconstruction(tmp_path / "recon.png", x["audio"], x["frame"], x["mask_a"], x["mask_v"],
                                x["pred_a"], x["pred_v"], p, title="step 10")
    assert_png(out)
    out = V.plot_priority_map(tmp_path / "prio.png", x["audio"], x["frame"], torch.rand(8), torch.rand(9),
                              1 - x["mask_a"], 1 - x["mask_v"], p, grid_a=GRID_A, grid_v=GRID_V)
    assert_png(out)
    with pytest.raises(ValueError, match="grid"):
        V.plot_priority_map(tmp_path / "bad.png", x["audio"], x["frame"], torch.rand(8), torch.rand(9),
                            1 - x["mask_a"], 1 - x["mask_v"], p, grid_a=(4, 2))

    # loss curves from a metrics.jsonl with a resume (start event) and an image record
    lines = [{"event": "start", "step": 0, "config": {}}]
    lines += [{"step": s, "loss/total": 2.0 / (s + 1), "loss/contrastive": 4.0 - s / 10} for s in range(0, 30, 3)]
    lines += [{"event": "start", "step": 12, "config": {}}, {"step": 15, "loss/total": 0.1}, {"step": 15, "images": {}}]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert_png(V.plot_loss_curves(tmp_path / "loss.png", jsonl))
    assert_png(V.plot_loss_curves(tmp_path / "loss2.png", lines[1:5], keys=["loss/total"]))

    assert_png(V.plot_recall_curves(tmp_path / "recall.png", {"audio->video": {1: 0.1, 5: 0.3, 10: 0.45},
                                                               "video->audio": {1: 0.08, 5: 0.25, 10: 0.4}}))
    frames = [torch.rand(3, 8, 8) for _ in range(6)]
    assert_png(V.plot_retrieval_examples(tmp_path / "retrieval.png", [x["audio"].T, frames[0]],
                                         [frames[1:6], frames[2:5]], correct=[[True] + [False] * 4, [False] * 3]))


def test_display_constants_match_the_data_pipeline():
    from tgdp.data.audio import FBANK_MEAN, FBANK_STD
    from tgdp.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    assert (V.IMAGE_MEAN, V.IMAGE_STD, V.FBANK_MEAN, V.FBANK_STD) == (IMAGENET_MEAN, IMAGENET_STD, FBANK_MEAN,
                                                                      FBANK_STD)
