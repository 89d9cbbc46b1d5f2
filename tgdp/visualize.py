"""Pictures a person checks during training: reconstructions, teacher priorities, losses, recall@K.

Pure functions of arrays (numpy or torch) to PNG files: no model, trainer or data imports, so a
notebook or a test can call them on anything. Matplotlib's object API (`Figure`, Agg canvas) is
used instead of pyplot, so no global backend or figure registry is touched. Every file is written
to a temporary name and renamed, so a reader (wandb, a browser) never sees half a PNG.

Layouts follow tgdp.models.patches: a patch vector is (p_row, p_col, channel), channel fastest;
the spectrogram [T, F] is shown as an image [F, T] (rows = frequency, low at the bottom), so
audio patch index = f_row * (T / p) + t_col. Masks use 1 = removed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

# The data pipeline's normalisation (tgdp.data.transforms.IMAGENET_*, tgdp.data.audio.FBANK_*);
# repeated, not imported, because those modules import torchvision / torchaudio (seconds).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
FBANK_MEAN = -5.081
FBANK_STD = 4.4849
MASKED_GREY = 0.85  # the colour of a removed patch in an RGB panel


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def patchify(img: np.ndarray, p: int) -> np.ndarray:
    """[H, W, C] -> [(H/p) * (W/p), p * p * C], the layout of tgdp.models.patches.patchify."""
    H, W, C = img.shape
    h, w = H // p, W // p
    return img[: h * p, : w * p].reshape(h, p, w, p, C).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * C)


def unpatchify(x: np.ndarray, grid: tuple[int, int], p: int) -> np.ndarray:
    """[h * w, p * p * C] -> [h * p, w * p, C]; the inverse of `patchify`."""
    h, w = grid
    if x.shape[0] != h * w:
        raise ValueError(f"expected {h * w} patches for grid {grid}, got {x.shape[0]}")
    C = x.shape[1] // (p * p)
    return x.reshape(h, w, p, p, C).transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, C)


def patch_pixels(values: Any, grid: tuple[int, int], p: int) -> np.ndarray:
    """Per-patch values [h * w] -> a pixel map [h * p, w * p] (each patch a constant block)."""
    return np.kron(_np(values).reshape(grid), np.ones((p, p)))


def _audio_image(audio: Any, p: int) -> tuple[np.ndarray, tuple[int, int]]:
    """fbank [T, F] -> image [F', T'] cropped to whole patches, and its grid (F/p, T/p)."""
    img = _np(audio).T
    grid = (img.shape[0] // p, img.shape[1] // p)
    return img[: grid[0] * p, : grid[1] * p], grid


def _frame_image(frame: Any, p: int) -> tuple[np.ndarray, tuple[int, int]]:
    """[3, H, W] (or [H, W, 3]) -> [H', W', 3] cropped to whole patches, and its grid."""
    img = _np(frame)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    grid = (img.shape[0] // p, img.shape[1] // p)
    return img[: grid[0] * p, : grid[1] * p], grid


def _paste(inp: np.ndarray, pred: np.ndarray, removed: np.ndarray, norm_pix: bool) -> np.ndarray:
    """Input patches [N, P] where visible, predictions where removed (un-standardised if norm_pix)."""
    if norm_pix:  # the model predicted per-patch standardised pixels: use the input patch's statistics
        mean, var = inp.mean(-1, keepdims=True), inp.var(-1, ddof=1, keepdims=True)
        pred = pred * np.sqrt(var + 1e-6) + mean
    return np.where(removed[:, None], pred, inp)


def reconstruction_panels(audio: Any, frame: Any, mask_a: Any, mask_v: Any, pred_a: Any, pred_v: Any, patch: int,
                          image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD,
                          fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD,
                          norm_pix: bool = False) -> dict[str, np.ndarray]:
    """The six panels of `plot_reconstruction`, de-normalised, as arrays (exactly testable).

    audio [T, F], frame [3, H, W] (normalised model inputs); mask_* [N] with 1 = removed;
    pred_a [N_a, p*p], pred_v [N_v, p*p*3]. Returns audio_{input,masked,recon} [F, T] in fbank
    units and video_{input,masked,recon} [H, W, 3] in [0, 1]; masked panels are NaN on removed patches.
    """
    p = patch
    out: dict[str, np.ndarray] = {}
    mean_v, std_v = np.asarray(image_mean, float), np.asarray(image_std, float)
    for name, (img, grid), mask, pred in (("audio", _audio_image(audio, p), mask_a, pred_a),
                                          ("video", _frame_image(frame, p), mask_v, pred_v)):
        img3 = img[..., None] if img.ndim == 2 else img
        removed = _np(mask).reshape(-1) > 0.5
        patches = patchify(img3, p)
        recon = unpatchify(_paste(patches, _np(pred).reshape(patches.shape), removed, norm_pix), grid, p)
        if name == "audio":
            denorm = lambda x: x[..., 0] * fbank_std + fbank_mean  # noqa: E731
        else:
            denorm = lambda x: np.clip(x * std_v + mean_v, 0.0, 1.0)  # noqa: E731
        hole = patch_pixels(removed, grid, p) > 0.5
        out[f"{name}_input"] = denorm(img3)
        out[f"{name}_masked"] = np.where(hole if name == "audio" else hole[..., None], np.nan, denorm(img3))
        out[f"{name}_recon"] = denorm(recon)
    return out


def _save(fig: Figure, path: str | Path) -> Path:
    """Render to `path` atomically (tmp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _show(ax: Any, img: np.ndarray, title: str, spec: bool, vmin: float | None = None,
          vmax: float | None = None, cmap: str = "magma") -> Any:
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if spec:  # time on x, frequency on y (low at the bottom); NaN = removed, drawn light grey
        cm = colormaps[cmap].with_extremes(bad=(MASKED_GREY,) * 3)
        return ax.imshow(img, origin="lower", aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
    if img.ndim == 3:
        img = np.where(np.isnan(img), MASKED_GREY, img)
    return ax.imshow(img, interpolation="nearest", cmap=None if img.ndim == 3 else "gray")


def plot_reconstruction(path: str | Path, audio: Any, frame: Any, mask_a: Any, mask_v: Any, pred_a: Any,
                        pred_v: Any, patch: int, image_mean: Sequence[float] = IMAGE_MEAN,
                        image_std: Sequence[float] = IMAGE_STD, fbank_mean: float = FBANK_MEAN,
                        fbank_std: float = FBANK_STD, norm_pix: bool = False, title: str = "") -> Path:
    """Spectrogram and frame: input / masked input / reconstruction (visible patches pasted back)."""
    panels = reconstruction_panels(audio, frame, mask_a, mask_v, pred_a, pred_v, patch, image_mean, image_std,
                                   fbank_mean, fbank_std, norm_pix)
    fig = Figure(figsize=(12, 6), dpi=100)
    axes = fig.subplots(2, 3, gridspec_kw={"height_ratios": [1, 1.3]})
    vmin, vmax = np.nanpercentile(panels["audio_input"], [1, 99])
    for col, (key, label) in enumerate((("input", "input"), ("masked", "masked input"),
                                        ("recon", "reconstruction + visible"))):
        _show(axes[0, col], panels[f"audio_{key}"], f"spectrogram: {label}", True, vmin, vmax)
        _show(axes[1, col], panels[f"video_{key}"], f"frame: {label}", False)
    axes[0, 0].set_ylabel("mel bin")
    axes[0, 0].set_xlabel("frame (time)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def priority_panels(audio: Any, frame: Any, scores_a: Any, scores_v: Any, kept_a: Any, kept_v: Any, patch: int,
                    image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD,
                    fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD) -> dict[str, np.ndarray]:
    """Arrays of `plot_priority_map`: {audio,video}_{input,scores,kept}; kept panels NaN on dropped patches."""
    out: dict[str, np.ndarray] = {}
    for name, (img, grid), scores, kept in (("audio", _audio_image(audio, patch), scores_a, kept_a),
                                            ("video", _frame_image(frame, patch), scores_v, kept_v)):
        if name == "audio":
            img = img * fbank_std + fbank_mean
        else:
            img = np.clip(img * np.asarray(image_std) + np.asarray(image_mean), 0.0, 1.0)
        dropped = patch_pixels(_np(kept).reshape(-1) < 0.5, grid, patch) > 0.5
        out[f"{name}_input"] = img
        out[f"{name}_scores"] = patch_pixels(scores, grid, patch)
        out[f"{name}_kept"] = np.where(dropped if img.ndim == 2 else dropped[..., None], np.nan, img)
    return out


def plot_priority_map(path: str | Path, audio: Any, frame: Any, scores_a: Any, scores_v: Any, kept_a: Any,
                      kept_v: Any, patch: int, grid_a: tuple[int, int] | None = None,
                      grid_v: tuple[int, int] | None = None, title: str = "", **norm: Any) -> Path:
    """The teacher's priorities over the spectrogram and the frame, and what the contrastive pass kept.

    kept_* [N] with 1 = kept (the complement of a Masking's mask). Grids default to the inputs'
    shapes // patch; passing them checks that the scores match the model's layout.
    """
    panels = priority_panels(audio, frame, scores_a, scores_v, kept_a, kept_v, patch, **norm)
    for name, grid in (("audio", grid_a), ("video", grid_v)):
        have = tuple(s // patch for s in panels[f"{name}_scores"].shape[:2])
        if grid is not None and tuple(grid) != have:
            raise ValueError(f"{name} grid {tuple(grid)} does not match the input's {have}")
    fig = Figure(figsize=(12, 6), dpi=100)
    axes = fig.subplots(2, 3, gridspec_kw={"height_ratios": [1, 1.3]})
    vmin, vmax = np.nanpercentile(panels["audio_input"], [1, 99])
    for row, name in enumerate(("audio", "video")):
        spec = name == "audio"
        what = "spectrogram" if spec else "frame"
        _show(axes[row, 0], panels[f"{name}_input"], what, spec, vmin, vmax)
        if spec:
            im = _show(axes[row, 1], panels["audio_scores"], "teacher priority", True, cmap="viridis")
        else:  # the frame in grey under a translucent heat map, so the salient object stays visible
            _show(axes[row, 1], panels["video_input"].mean(-1), "teacher priority", False)
            im = axes[row, 1].imshow(panels["video_scores"], cmap="viridis", alpha=0.6, interpolation="nearest")
        fig.colorbar(im, ax=axes[row, 1], fraction=0.046, pad=0.02)
        kept = np.isfinite(panels[f"{name}_kept"]).mean()  # RGB channels are NaN together
        _show(axes[row, 2], panels[f"{name}_kept"], f"kept by contrastive pass ({kept:.0%})", spec, vmin, vmax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(path: str | Path, metrics: str | Path | Sequence[Mapping[str, Any]],
                     keys: Sequence[str] | None = None, title: str = "") -> Path:
    """One small plot per loss term vs step; log y when all its values are > 0.

    metrics: a metrics.jsonl (read as tgdp.metrics.read_metrics would, resumes resolved) or a list
    of {"step": s, key: value} dicts. keys default to every numeric key starting with "loss".
    """
    if isinstance(metrics, (str, Path)):
        from tgdp.metrics import read_metrics  # metrics imports torch; only needed for a file

        rows: Sequence[Mapping[str, Any]] = read_metrics(metrics)
    else:
        rows = metrics
    if keys is None:
        keys = sorted({k for r in rows for k, v in r.items() if k.startswith("loss") and _is_number(v)})
    keys = list(keys) or ["(no loss keys)"]
    cols = min(3, len(keys))
    fig = Figure(figsize=(4.2 * cols, 3.0 * math.ceil(len(keys) / cols)), dpi=100)
    axes = np.atleast_1d(fig.subplots(math.ceil(len(keys) / cols), cols, squeeze=False)).reshape(-1)
    for ax, key in zip(axes, keys):
        pts = sorted((r["step"], float(r[key])) for r in rows if key in r and _is_number(r[key]))
        xs, ys = [s for s, _ in pts], [v for _, v in pts]
        ax.plot(xs, ys, lw=1.2, marker="." if len(xs) < 50 else None)
        finite = [v for v in ys if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 3:
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_recall_curves(path: str | Path, recalls: Mapping[str, Mapping[int, float]], title: str = "") -> Path:
    """Retrieval recall@K vs K, one line per direction (e.g. {"audio->video": {1: .2, 5: .5, 10: .6}})."""
    fig = Figure(figsize=(5, 3.6), dpi=100)
    ax = fig.subplots()
    for i, (direction, by_k) in enumerate(recalls.items()):
        ks = sorted(int(k) for k in by_k)
        vals = [float(by_k[k]) if k in by_k else float(by_k[str(k)]) for k in ks]  # type: ignore[index]
        ax.plot(ks, vals, marker="o", label=direction)
        for k, v in zip(ks, vals):
            ax.annotate(f"{v:.3g}", (k, v), textcoords="offset points", xytext=(0, 5 if i % 2 == 0 else -11),
                        fontsize=7, ha="center")  # alternate above / below so close lines stay readable
    all_ks = sorted({int(k) for by_k in recalls.values() for k in by_k})
    ax.set_xscale("log")
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "retrieval recall@K", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _display(img: Any) -> tuple[np.ndarray, str | None]:
    """An image for imshow: [3, H, W] / [H, W, 3] RGB scaled to [0, 1], or [H, W] with a colour map."""
    a = _np(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and (a.min() < 0 or a.max() > 1):
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    return a, (None if a.ndim == 3 else "magma")


def plot_retrieval_examples(path: str | Path, queries: Sequence[Any], candidates: Sequence[Sequence[Any]],
                            correct: Sequence[Sequence[bool]] | None = None,
                            labels: Sequence[str] | None = None, title: str = "") -> Path:
    """A grid: each row one query then its top-k candidates, the true match framed green.

    Images are [3, H, W] / [H, W, 3] (RGB, de-normalised or min-max scaled here) or [H, W]
    (a spectrogram, shown with a colour map, time on x).
    """
    rows, k = len(queries), max((len(c) for c in candidates), default=0)
    fig = Figure(figsize=(1.8 * (k + 1), 1.8 * rows), dpi=100)
    axes = np.asarray(fig.subplots(rows, k + 1, squeeze=False))
    green = to_rgb("tab:green")
    for r in range(rows):
        for c in range(k + 1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            item = queries[r] if c == 0 else (candidates[r][c - 1] if c - 1 < len(candidates[r]) else None)
            if item is None:
                ax.set_visible(False)
                continue
            img, cmap = _display(item)
            ax.imshow(img, cmap=cmap, aspect="auto", origin="lower" if img.ndim == 2 else "upper")
            if c == 0:
                ax.set_title(labels[r] if labels else f"query {r}", fontsize=8)
            else:
                ax.set_title(f"#{c}", fontsize=8)
                if correct is not None and correct[r][c - 1]:
                    for spine in ax.spines.values():
                        spine.set_edgecolor(green)
                        spine.set_linewidth(3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["patch_pixels", "patchify", "plot_loss_curves", "plot_priority_map", "plot_recall_curves",
           "plot_reconstruction", "plot_retrieval_examples", "priority_panels", "reconstruction_panels",
           "unpatchify"]
