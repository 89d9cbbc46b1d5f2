"""Model oracles (docs/method.md 1, 3.2, 3.4) and parity with the official-style passes.

Only the `tiny` preset runs forward; `base` / `cavmae` are built on the meta device for counting.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgdp.config import ConfigError, load_config
from tgdp.models import CAVMAE, ModelConfig, build_model
from tgdp.models import reference as ref
from tgdp.models.blocks import Block
from tgdp.models.masking import mask_generator, random_masking, rank_patches, ranked_masking
from tgdp.models.pos_embed import sincos_2d

torch.set_num_threads(1)
B = 4


def cfg_of(preset: str, *overrides: str) -> ModelConfig:
    return load_config(ModelConfig, "model", preset, list(overrides))


@pytest.fixture(scope="module")
def tiny() -> CAVMAE:
    torch.manual_seed(0)
    return build_model(cfg_of("tiny")).eval()


@pytest.fixture(scope="module")
def tiny_nocls() -> CAVMAE:
    torch.manual_seed(1)
    return build_model(cfg_of("tiny", "cls_token=false", "num_register_tokens=0")).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(B, 64, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)


def lengths_seen(block: torch.nn.Module, fn) -> list[int]:
    """Sequence lengths entering `block` while fn() runs."""
    seen: list[int] = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        fn()
    finally:
        handle.remove()
    return seen


# ---------------------------------------------------------------- config, counts, keys
def test_presets_and_validation_errors_name_the_field() -> None:
    base, cav, tiny_cfg = cfg_of("base"), cfg_of("cavmae"), cfg_of("tiny")
    assert base == ModelConfig()  # base = the released TG-DP defaults
    assert (base.audio_grid, base.num_patches_a, base.num_patches_v) == ((8, 26), 208, 196)  # oracle 1
    assert (cav.audio_grid, cav.num_patches_a, cav.video_grid) == ((8, 64), 512, (14, 14))
    assert (base.patch_size**2, base.patch_size**2 * 3) == (256, 768)  # oracle 2
    assert base.unified_depth == 1 and not cav.cls_token and cav.num_register_tokens == 0
    assert tiny_cfg.num_patches_a == 32 and tiny_cfg.num_patches_v == 16
    with pytest.raises(ConfigError, match="model.embed_dim"):
        cfg_of("base", "embed_dim=100")
    with pytest.raises(ConfigError, match="model.audio_frames"):
        cfg_of("base", "audio_frames=420")
    with pytest.raises(ConfigError, match="model.modality_specific_depth"):
        cfg_of("base", "modality_specific_depth=12")
    with pytest.raises(ConfigError, match="num_register_tokens"):
        cfg_of("base", "num_register_tokens=-1")
    with pytest.raises(ConfigError, match="not_a_field"):
        cfg_of("base", "not_a_field=1")


@pytest.mark.parametrize("preset,overrides,total,trainable,keys", [
    ("base", (), 190_660_864, 190_143_744, 650),
    ("cavmae", (), 191_036_160, 190_129_920, 647),
    ("base", ("contrastive_heads=true",), 219_036_928, 218_519_808, 730),
    # CAVMAE_DP constructor defaults: T = 1024, R = 4, no CLS, heads
    ("cavmae", ("num_register_tokens=4", "contrastive_heads=true"), 219_418_368, 218_512_128, None),
    # ViT-L/16 encoders (23 + 23 modality-specific blocks of 12 d^2 + 21 d = 12,604,416 at d = 1024,
    # 1 unified block), the base decoder
    ("large", (), 620_409_856, 619_789_312, 1130),
])
def test_parameter_and_key_counts(preset: str, overrides: tuple[str, ...], total: int, trainable: int,
                                  keys: int | None) -> None:
    model = build_model(cfg_of(preset, *overrides), "meta")
    assert model.num_parameters() == total
    assert model.num_parameters(trainable_only=True) == trainable
    if keys is not None:
        assert len(model.state_dict()) == keys


def test_block_sizes_and_structure() -> None:
    model = build_model(cfg_of("base", "contrastive_heads=true"), "meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.blocks_a[0]) == 7_094_016 and count(model.decoder_blocks[0]) == 3_156_480  # oracle 3
    assert len(model.blocks_a) == len(model.blocks_v) == 11 and len(model.blocks_u) == 1  # oracle 4
    assert len(model.constrative_head_audio) == len(model.constrative_head_visual) == 2
    assert tuple(model.register_tokens.shape) == (16, 768)  # oracle 5
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v"}
    block_keys = sorted(k for k in model.state_dict() if k.startswith("blocks_u.0."))
    assert len(block_keys) == 20 and "blocks_u.0.norm1_a.weight" in block_keys and "blocks_u.0.mlp.fc2.bias" in block_keys
    for name in CAVMAE.FSDP_FORWARD_METHODS:  # the entry points FSDP2 must register
        assert callable(getattr(model, name))
    assert isinstance(model.blocks_a, torch.nn.ModuleList) and isinstance(model.decoder_blocks, torch.nn.ModuleList)


# ---------------------------------------------------------------- init and position tables
def official_sincos(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Transcription of CAV-MAE's numpy `get_2d_sincos_pos_embed` (the oracle)."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000**omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32)), axis=0)
    grid = grid.reshape([2, 1, grid_w, grid_h])
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_tables() -> None:  # oracle 11
    table = sincos_2d(768, 8, 26)  # audio at T = 416: rows = frequency, cols = time
    assert torch.allclose(table, torch.from_numpy(official_sincos(768, 8, 26)).float(), atol=1e-6)
    assert torch.equal(table[0, :384], torch.cat([torch.zeros(192), torch.ones(192)]))
    assert torch.equal(table[0, 384:], torch.cat([torch.zeros(192), torch.ones(192)]))
    grid = table.reshape(8, 26, 768)
    assert torch.equal(grid[:, :, :384], grid[:1, :, :384].expand(8, -1, -1))  # first half: column only
    assert torch.equal(grid[:, :, 384:], grid[:, :1, 384:].expand(-1, 26, -1))  # second half: row only
    assert torch.allclose(sincos_2d(512, 14, 14), torch.from_numpy(official_sincos(512, 14, 14)).float(), atol=1e-6)


def test_official_init(tiny: CAVMAE) -> None:
    m, cfg = tiny, tiny.cfg
    for name, grid in [("pos_embed_a", m.grid_a), ("decoder_pos_embed_v", m.grid_v)]:
        table = getattr(m, name)
        assert not table.requires_grad and torch.equal(table[0], sincos_2d(table.shape[-1], *grid))
    w = m.patch_embed_v.proj.weight
    bound = (6.0 / (w[0].numel() + w.shape[0])) ** 0.5  # xavier on the [D, C*p*p] view
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    qkv = m.blocks_a[0].attn.qkv
    assert qkv.weight.abs().max() <= (6.0 / (cfg.embed_dim * 4)) ** 0.5 and torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
    assert torch.equal(m.blocks_u[0].norm2_v.weight, torch.ones(cfg.embed_dim)) and m.norm.eps == 1e-5
    assert 0.005 < m.mask_token.std() < 0.05 and 0.5 < m.register_tokens.std() < 1.5
    # meta build + to_empty + init_weights gives a usable model (the FSDP2 initialisation path)
    late = build_model(cfg, "meta").to_empty(device="cpu")
    late.init_weights()
    assert torch.equal(late.pos_embed_v, m.pos_embed_v) and torch.isfinite(late.blocks_u[0].attn.qkv.weight).all()


# ---------------------------------------------------------------- patches, targets, MAE loss
def test_patchify_roundtrip_and_audio_patch_order(tiny: CAVMAE, batch) -> None:  # oracle 9
    audio, frames = batch
    p, (rows, cols) = tiny.cfg.patch_size, tiny.grid_a
    pa = tiny.patchify_audio(audio)
    assert pa.shape == (B, rows * cols, p * p)
    assert torch.equal(tiny.unpatchify_audio(pa), audio) and torch.equal(tiny.unpatchify_video(tiny.patchify_video(frames)), frames)
    f_row, t_col = 2, 5  # patch index f_row * (T/p) + t_col; vector (p_row = freq, p_col = time)
    expected = audio[:, t_col * p:(t_col + 1) * p, f_row * p:(f_row + 1) * p].transpose(1, 2).reshape(B, -1)
    assert torch.equal(pa[:, f_row * cols + t_col], expected)
    pv = tiny.patchify_video(frames)  # (p_row, p_col, RGB): channel fastest
    assert torch.equal(pv[:, 1 * 4 + 2, :3], frames[:, :, 8, 16])
    # the patch embedding numbers tokens exactly like patchify
    ta, _ = tiny.tokenize(audio, frames)
    W, b = tiny.patch_embed_a.proj.weight.reshape(tiny.cfg.embed_dim, -1), tiny.patch_embed_a.proj.bias
    assert torch.allclose(ta - tiny.pos_embed_a - tiny.modality_a, pa @ W.T + b, atol=1e-5)


@pytest.mark.parametrize("channels, height, width", [(3, 64, 64), (1, 128, 48), (3, 70, 37)])
def test_patch_projection_is_the_official_convolution(channels: int, height: int, width: int) -> None:
    """The GEMM form of the patch embedding equals Conv2d(p, stride p) + flatten, values and
    gradients (same weight), including inputs that do not divide into whole patches."""
    from tgdp.models.cavmae import PatchProjection

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 32, kernel_size=16, stride=16)
    ours = PatchProjection(channels, 32, kernel_size=16, stride=16)
    ours.load_state_dict(conv.state_dict())
    x = torch.randn(2, channels, height, width, requires_grad=True)
    want = conv(x).flatten(2).transpose(1, 2)
    got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (x, conv.weight, conv.bias), grad)
    got_grads = torch.autograd.grad(got, (x, ours.weight, ours.bias), grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_patch_projection_refuses_what_is_not_a_patch_embedding() -> None:
    from tgdp.models.cavmae import PatchProjection

    with pytest.raises(ValueError, match="stride must equal kernel_size"):
        PatchProjection(3, 32, kernel_size=16, stride=8)
    with pytest.raises(ValueError, match="padding"):
        PatchProjection(3, 32, kernel_size=16, stride=16, padding=1)


def test_mae_loss_and_norm_pix(tiny: CAVMAE, batch) -> None:  # oracle 10
    audio, frames = batch
    target_a, target_v = tiny.mae_targets(audio, frames, norm_pix=True)
    assert torch.allclose(target_v.mean(-1), torch.zeros(B, 16), atol=1e-5)
    var = tiny.patchify_video(frames).var(-1)
    assert torch.allclose(target_v.var(-1), var / (var + 1e-6), atol=1e-5)
    m = random_masking(B, tiny.num_patches_a, 0.75, torch.Generator().manual_seed(0))
    pred = torch.randn_like(target_a)
    loss = tiny.forward_mae_loss(pred, target_a, m.mask)
    changed = torch.where(m.mask.bool().unsqueeze(-1), pred, pred + 5.0)  # only visible patches differ
    assert torch.equal(tiny.forward_mae_loss(changed, target_a, m.mask), loss)
    perfect = torch.where(m.mask.bool().unsqueeze(-1), target_a, pred)
    assert tiny.forward_mae_loss(perfect, target_a, m.mask) == 0
    manual = ((pred - target_a) ** 2).mean(-1)[m.mask.bool()].mean()
    assert torch.allclose(loss, manual)


# ---------------------------------------------------------------- attention column
@pytest.mark.parametrize("modality", [None, "a", "v"])
def test_fused_cls_column_equals_explicit_softmax_map(modality) -> None:
    torch.manual_seed(0)
    block = Block(32, 4).double()
    for p in block.parameters():  # non-trivial norms so that the modality choice matters
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 13, 32, dtype=torch.float64)
    out, scores = block(x, modality, return_cls_attention=True)
    out_ref, attn = block.forward_with_attention_map(x, modality)
    assert attn.shape == (3, 4, 13, 13) and torch.allclose(attn.sum(-1), torch.ones(3, 4, 13, dtype=torch.float64))
    assert torch.allclose(scores, attn[:, :, 1:, 0].mean(dim=1), atol=1e-12)
    assert torch.allclose(out, out_ref, atol=1e-12) and torch.allclose(block(x, modality), out_ref, atol=1e-12)


# ---------------------------------------------------------------- the passes
def test_shapes_and_stream_lengths(tiny: CAVMAE, batch) -> None:  # oracles 5, 7, 8
    audio, frames = batch
    N_a, N_v, R = tiny.num_patches_a, tiny.num_patches_v, tiny.num_registers
    ma, mv = tiny.random_masks(B, 0.75, 0.75, mask_generator(0, 0, 0, 0, "recon"))
    ta, tv = tiny.tokenize(audio, frames)
    assert ta.shape == (B, N_a, 64) and tv.shape == (B, N_v, 64)
    seen_u: list[int] = []
    seen_a = lengths_seen(tiny.blocks_a[0], lambda: seen_u.extend(lengths_seen(
        tiny.blocks_u[0], lambda: tiny.encode_masked(ta, tv, ma, mv))))
    assert seen_a == [1 + ma.len_keep + R] and seen_u == [ma.len_keep + mv.len_keep]  # joint: no CLS / registers
    latent = tiny.encode_masked(ta, tv, ma, mv)
    assert latent.shape == (B, 8 + 4, 64)
    seen_d = lengths_seen(tiny.decoder_blocks[0], lambda: tiny.forward_decoder(latent, ma, mv))
    pred_a, pred_v = tiny.forward_decoder(latent, ma, mv)
    assert seen_d == [N_a + N_v] and pred_a.shape == (B, N_a, 64) and pred_v.shape == (B, N_v, 192)
    seen_u = lengths_seen(tiny.blocks_u[0], lambda: tiny.forward_features(audio, frames))
    assert seen_u == [1 + N_a, 1 + N_v]  # modality streams, registers dropped; no joint stream
    feats = tiny.forward_features(audio, frames)
    assert feats.cls_a.shape == (B, 64) and feats.local_a.shape == (B, N_a, 64) and feats.local_v.shape == (B, N_v, 64)


def test_reconstruction_pass_matches_official(tiny: CAVMAE, tiny_nocls: CAVMAE, batch) -> None:
    audio, frames = batch
    for model in (tiny, tiny_nocls):
        for norm_pix in (False, True):
            ma, mv = model.random_masks(B, 0.75, 0.75, mask_generator(1, 2, 0, 0, "recon"))
            official = ref.official_style_encoder(model, audio, frames, ma, mv)
            latent = model.encode_masked(*model.tokenize(audio, frames), ma, mv)
            assert torch.allclose(latent, official["x"], atol=1e-5)
            pred_a, pred_v = model.forward_decoder(latent, ma, mv)
            off_a, off_v = ref.official_style_decoder(model, official["x"], ma, mv)
            assert torch.allclose(pred_a, off_a, atol=1e-5) and torch.allclose(pred_v, off_v, atol=1e-5)
            target_a, target_v = model.mae_targets(audio, frames, norm_pix=norm_pix)
            for pred, off, target, inputs, mask, m in ((pred_a, off_a, target_a, audio, ma, "a"),
                                                      (pred_v, off_v, target_v, frames, mv, "v")):
                official_loss = ref.official_mae_loss(model, inputs, off, mask.mask, m, norm_pix=norm_pix)
                assert torch.allclose(model.forward_mae_loss(pred, target, mask.mask), official_loss, atol=1e-5)


def test_contrastive_pass_matches_official(tiny: CAVMAE, tiny_nocls: CAVMAE, batch) -> None:
    audio, frames = batch
    g = torch.Generator().manual_seed(4)
    for model in (tiny, tiny_nocls):
        ra = rank_patches(torch.rand(B, model.num_patches_a, generator=g))
        rv = rank_patches(torch.rand(B, model.num_patches_v, generator=g))
        ma, mv = ranked_masking(ra, 0.5), ranked_masking(rv, 0.5)
        ours = model.encode_global(*model.tokenize(audio, frames), ma, mv)
        official = ref.official_style_encoder(model, audio, frames, ma, mv)
        for key in ("cls_a", "cls_v", "local_a", "local_v"):
            assert torch.allclose(getattr(ours, key), official[key], atol=1e-5), key
        assert ours.local_a.shape[1] == ma.len_keep
    nocls = tiny_nocls.forward_features(audio, frames)  # CAV-MAE: global = mean of the patch tokens
    assert torch.allclose(nocls.cls_a, nocls.local_a.mean(dim=1))


def test_masking_off_ranked_and_random_paths_agree(tiny: CAVMAE, batch) -> None:
    audio, frames = batch
    tokens = tiny.tokenize(audio, frames)
    g = torch.Generator().manual_seed(8)
    ranked = tiny.encode_global(*tokens, ranked_masking(rank_patches(torch.rand(B, 32, generator=g)), 0.0),
                                ranked_masking(rank_patches(torch.rand(B, 16, generator=g)), 0.0))
    shuffled = tiny.encode_global(*tokens, random_masking(B, 32, 0.0, g), random_masking(B, 16, 0.0, g))
    full = tiny.forward_features(audio, frames)
    for out in (ranked, shuffled):
        assert torch.allclose(out.cls_a, full.cls_a, atol=1e-5) and torch.allclose(out.cls_v, full.cls_v, atol=1e-5)


def test_teacher_matches_official_up_to_its_shuffle(tiny: CAVMAE, batch) -> None:  # oracles 6, 15, 16
    audio, frames = batch
    with torch.no_grad():
        seen = lengths_seen(tiny.blocks_a[0], lambda: tiny.teacher_forward(audio, frames))
        ours = tiny.teacher_forward(audio, frames)
        official = ref.official_style_teacher(tiny, audio, frames, torch.Generator().manual_seed(5))
    assert seen == [1 + tiny.num_patches_a + tiny.num_registers]  # full view: every patch present
    assert not ours.scores_a.requires_grad and all(p.grad is None for p in tiny.parameters())
    attn_a, ids_a = official["attn_a"], official["ids_shuffle_a"]
    assert attn_a.shape == (B, 4, 33, 33) and torch.allclose(attn_a.sum(-1), torch.ones(B, 4, 33), atol=1e-5)
    assert not torch.equal(ids_a, torch.arange(32).expand(B, 32))  # the official teacher DID shuffle
    for m in ("a", "v"):
        ranks_off, _, scores_off = ref.official_patch2cls_rank(official[f"attn_{m}"])
        ids = official[f"ids_shuffle_{m}"]
        scores = getattr(ours, f"scores_{m}")
        assert torch.allclose(scores.sort(dim=1).values, scores_off.sort(dim=1).values, atol=1e-6)  # same multiset
        assert torch.allclose(scores.gather(1, ids), scores_off, atol=1e-6)  # equal once un-shuffled
        assert torch.equal(ids.gather(1, ranks_off), rank_patches(scores))  # official ranks mapped back = ours
        assert not torch.equal(ranks_off, rank_patches(scores))  # ... and NOT equal unmapped (the bug)
        assert torch.allclose(getattr(ours, f"cls_{m}"), official[f"cls_{m}"], atol=1e-5)
    assert torch.isfinite(ours.scores_a).all() and (ours.scores_v > 0).all()
    with pytest.raises(ValueError, match="cls_token"):
        build_model(cfg_of("tiny", "cls_token=false")).teacher_forward(audio, frames)


def test_step_passes_match_reference_and_train(tiny: CAVMAE, batch) -> None:
    audio, frames = batch
    student, teacher = build_model(tiny.cfg), build_model(tiny.cfg).eval()
    teacher.load_state_dict(tiny.state_dict())  # EMA teacher initialised equal to the student
    student.load_state_dict(tiny.state_dict())
    ours = ref.optimised_passes(student, teacher, audio, frames, seed=3, step=7)
    official = ref.official_style_passes(student, teacher, audio, frames, seed=3, step=7)
    for key, value in ours.items():
        assert torch.allclose(value, official[key], atol=1e-5), key
    loss = ours["loss_rec"] + 0.01 * ours["cls_a"].square().sum() + (ours["cls_a"] - ours["t_cls_a"]).square().sum()
    loss.backward()
    assert student.blocks_a[0].attn.qkv.weight.grad is not None and student.blocks_u[0].norm1_a.weight.grad is not None
    assert student.pos_embed_a.grad is None and all(p.grad is None for p in teacher.parameters())


def test_contrastive_heads_variant(batch) -> None:
    audio, frames = batch
    torch.manual_seed(2)
    model = build_model(cfg_of("tiny", "contrastive_heads=true")).eval()
    seen = lengths_seen(model.constrative_head_audio[1], lambda: model.forward_features(audio, frames))
    assert seen == [1 + model.num_patches_a]
    with torch.no_grad():  # the teacher never runs the heads (official teacher mode)
        t = model.teacher_forward(audio, frames)
        official = ref.official_style_teacher(model, audio, frames, torch.Generator().manual_seed(0))
    assert torch.allclose(t.cls_v, official["cls_v"], atol=1e-5)


def test_per_block_fully_shard_covers_every_entry_point(tiny: CAVMAE, batch, tmp_path) -> None:
    """FSDP2 (one gloo rank): per-block `fully_shard` + root, entry points registered, same outputs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    audio, frames = batch
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sharded = build_model(tiny.cfg)
        sharded.load_state_dict(tiny.state_dict())
        mesh = init_device_mesh("cpu", (1,))
        for blocks in (sharded.blocks_a, sharded.blocks_v, sharded.blocks_u, sharded.decoder_blocks):
            for blk in blocks:
                fully_shard(blk, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        for name in CAVMAE.FSDP_FORWARD_METHODS:
            register_fsdp_forward_method(sharded, name)
        with torch.no_grad():
            t, t_ref = sharded.teacher_forward(audio, frames), tiny.teacher_forward(audio, frames)
        assert torch.allclose(t.scores_a, t_ref.scores_a, atol=1e-6) and torch.allclose(t.cls_v, t_ref.cls_v, atol=1e-5)
        ma, mv = sharded.random_masks(B, 0.75, 0.75, mask_generator(0, 0, 0, 0, "recon"))
        tokens = sharded.tokenize(audio, frames)
        pred_a, _ = sharded.forward_decoder(sharded.encode_masked(*tokens, ma, mv), ma, mv)
        g = sharded.encode_global(*tokens, ranked_masking(rank_patches(t.scores_a), 0.5),
                                  ranked_masking(rank_patches(t.scores_v), 0.5))
        (pred_a.square().mean() + g.cls_a.sum()).backward()
        assert sharded.blocks_u[0].attn.qkv.weight.grad is not None and sharded.pos_embed_a.grad is None
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- packed views and CLS-only blocks
def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("modality", [None, "a"])
def test_block_segments_equal_separate_sequences(modality) -> None:
    """Packed sequences: same outputs AND gradients as running each sequence alone."""
    torch.manual_seed(0)
    block = Block(32, 4).double()
    x1 = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 12, 32, dtype=torch.float64, requires_grad=True)
    packed = block(torch.cat([x1, x2], dim=1), modality, segments=(7, 12))
    alone = torch.cat([block(x1, modality), block(x2, modality)], dim=1)
    assert torch.allclose(packed, alone, atol=1e-12)
    w = torch.randn_like(packed)
    (packed * w).sum().backward()
    g_packed, gx_packed = _grads(block), (x1.grad.clone(), x2.grad.clone())
    block.zero_grad(set_to_none=True)
    x1.grad = x2.grad = None
    (alone * w).sum().backward()
    for name, g in _grads(block).items():
        assert torch.allclose(g_packed[name], g, atol=1e-10), name
    assert torch.allclose(gx_packed[0], x1.grad, atol=1e-12) and torch.allclose(gx_packed[1], x2.grad, atol=1e-12)
    with pytest.raises(ValueError, match="do not add up"):
        block(torch.cat([x1, x2], dim=1), segments=(7, 11))


@pytest.mark.parametrize("modality", [None, "v"])
def test_block_cls_only_is_row_zero_of_the_full_block(modality) -> None:
    torch.manual_seed(0)
    block = Block(32, 4).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 13, 32, dtype=torch.float64)
    full = block(x, modality)
    assert torch.allclose(block(x, modality, cls_only=True), full[:, :1], atol=1e-12)
    out, scores = block(x, modality, return_cls_attention=True, cls_only=True)
    full_out, full_scores = block(x, modality, return_cls_attention=True)
    assert out.shape == (3, 1, 32) and torch.allclose(out, full[:, :1], atol=1e-12)
    assert torch.allclose(scores, full_scores, atol=1e-12)


def test_encode_dual_equals_the_two_passes(tiny: CAVMAE, batch) -> None:
    """One packed run of the modality blocks = pass 1 (joint stream) + pass 2 (CLS vectors)."""
    audio, frames = batch
    model = build_model(cfg_of("tiny")).double()
    audio, frames = audio.double(), frames.double()
    ma, mv = model.random_masks(B, 0.75, 0.75, mask_generator(1, 2, 0, 0, "recon"))
    g = torch.Generator().manual_seed(4)
    ca = ranked_masking(rank_patches(torch.rand(B, model.num_patches_a, generator=g)), 0.5)
    cv = ranked_masking(rank_patches(torch.rand(B, model.num_patches_v, generator=g)), 0.5)

    def losses(dual: bool) -> torch.Tensor:
        tokens = model.tokenize(audio, frames)
        if dual:
            latent, glob = model.encode_dual(*tokens, ma, mv, ca, cv)
        else:
            latent, glob = model.encode_masked(*tokens, ma, mv), model.encode_global(*tokens, ca, cv)
        assert (glob.local_a is None) == dual
        return latent, glob.cls_a, glob.cls_v

    packed, separate = losses(True), losses(False)
    for p, s in zip(packed, separate):
        assert torch.allclose(p, s, atol=1e-12)
    sum(t.sum() * (i + 1) for i, t in enumerate(packed)).backward()
    g_packed = _grads(model)
    model.zero_grad(set_to_none=True)
    sum(t.sum() * (i + 1) for i, t in enumerate(separate)).backward()
    g_sep = _grads(model)
    assert g_packed.keys() == g_sep.keys()
    for name, g in g_sep.items():
        assert torch.allclose(g_packed[name], g, atol=1e-10), name
