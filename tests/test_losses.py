"""Oracles for tgdp.losses (docs/method.md 3.5-3.6) and the 2-rank gradient test.

The 2-rank test runs two real processes with a gloo group and DIFFERENT inputs per rank: symmetric
inputs hide gather-backward bugs (lightly#1531, cellarium-ml#184), because a wrong rank's gradient
then equals the right one.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.dist_tools import end_worker
from tgdp.losses import distillation_loss, gather_with_grad, info_nce, info_nce_local_single_direction

TAU = 0.05


def _orthonormal_rows(batch: int, dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, batch, generator=torch.Generator().manual_seed(0), dtype=dtype))
    return q.T.contiguous()  # [B, D], rows orthonormal


def _naive_symmetric(a: torch.Tensor, v: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """The textbook global symmetric InfoNCE, written independently of tgdp.losses."""
    a, v = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
    eye = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(a @ v.T / tau, eye) + F.cross_entropy(v @ a.T / tau, eye))


# ---------------------------------------------------------------- single-process oracles (item 14)

@pytest.mark.parametrize("batch", [2, 16, 512])
def test_orthonormal_oracle(batch: int) -> None:
    """a = v = orthonormal rows: logits are 20 on the diagonal, 0 elsewhere, per direction."""
    x = _orthonormal_rows(batch, 768)  # fp64: the value (~1e-6) is below fp32's resolution of logsumexp(20, ...)
    expected = math.log1p((batch - 1) * math.exp(-1.0 / TAU))
    loss, acc = info_nce(x, x.clone(), TAU)
    local, local_acc = info_nce_local_single_direction(x, x.clone(), TAU)
    # Symmetric loss = mean of two equal directions, so it equals each direction's value.
    # fp64 logsumexp around 20 resolves ~1e-14 absolute; the value itself is ~1e-6 at B = 512.
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-12)
    assert local.item() == pytest.approx(expected, rel=0, abs=1e-12)
    assert acc.item() == 1.0 and local_acc.item() == 1.0
    if batch == 512:
        assert expected == pytest.approx(1.05e-6, rel=0.01)  # log(1 + 511 e^-20)


def test_world_size_one_equals_two_cross_entropies() -> None:
    """No process group: the all-gather loss is the local symmetric one, inputs normalised inside."""
    g = torch.Generator().manual_seed(1)
    a, v = torch.randn(8, 32, generator=g) * 3, torch.randn(8, 32, generator=g)
    loss, acc = info_nce(a, v, TAU)
    loss_nd, _ = info_nce(a, v, TAU, distributed=False)
    an, vn = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
    eye = torch.arange(8)
    expected = 0.5 * (F.cross_entropy(an @ vn.T / TAU, eye) + F.cross_entropy(vn @ an.T / TAU, eye))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_nd, expected, rtol=1e-6, atol=1e-6)
    s = an @ vn.T
    expected_acc = 0.5 * ((s.argmax(1) == eye).float().mean() + (s.T.argmax(1) == eye).float().mean())
    assert acc.item() == pytest.approx(expected_acc.item())
    assert gather_with_grad(a) is a  # identity without a process group


def test_local_single_direction_is_column_softmax() -> None:
    """CAV-MAE's loss classifies each VIDEO column among all audios (softmax over dim 0)."""
    g = torch.Generator().manual_seed(2)
    a, v = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    loss, _ = info_nce_local_single_direction(a, v, TAU)
    s = F.normalize(a, dim=-1) @ F.normalize(v, dim=-1).T / TAU  # [audio, video]
    by_columns = -torch.log_softmax(s, dim=0).diagonal().mean()
    by_rows = -torch.log_softmax(s, dim=1).diagonal().mean()
    torch.testing.assert_close(loss, by_columns, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(s.T, torch.arange(6)), rtol=1e-6, atol=1e-6)
    assert abs(loss.item() - by_rows.item()) > 1e-3  # this case tells the two directions apart


def test_fp32_inside_for_bf16_inputs_and_under_autocast() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 128, generator=g).bfloat16().requires_grad_()
    v = torch.randn(64, 128, generator=g).bfloat16()
    ref, ref_acc = info_nce(a.detach().float(), v.float(), TAU)
    loss, acc = info_nce(a, v, TAU)
    assert loss.dtype == torch.float32 and acc.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert acc.item() == ref_acc.item()
    loss.backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16
    # The test can tell: doing the same arithmetic in bf16 lands visibly elsewhere.
    an, vn = F.normalize(a.detach(), dim=-1), F.normalize(v, dim=-1)
    eye = torch.arange(64)
    bf16 = 0.5 * (F.cross_entropy(an @ vn.T / TAU, eye) + F.cross_entropy(vn @ an.T / TAU, eye))
    assert abs(bf16.float().item() - ref.item()) > 1e-4
    # Autocast (which would run the matmuls in bf16) is switched off inside.
    af, vf = a.detach().float(), v.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = info_nce(af, vf, TAU)
        auto_local, _ = info_nce_local_single_direction(af, vf, TAU)
        auto_dist = distillation_loss(af, vf, vf, af)
    torch.testing.assert_close(auto, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(auto_local, info_nce_local_single_direction(af, vf, TAU)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(auto_dist, distillation_loss(af, vf, vf, af), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- distillation

def test_distillation_by_hand_and_zero() -> None:
    sa = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ta = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # per-sample squared distances 5, 13 -> mean 9
    sv = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    tv = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # 0, 1 -> mean 0.5
    assert distillation_loss(sa, sv, ta, tv).item() == pytest.approx(9.5)
    assert distillation_loss(sa, sv, sa.clone(), sv.clone()).item() == 0.0
    assert distillation_loss(sa, sv, 3 * sa, 2 * sv, normalize=True).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(sa.bfloat16(), sv.bfloat16(), ta, tv).dtype == torch.float32


def test_distillation_normalized_is_two_minus_two_cos() -> None:
    g = torch.Generator().manual_seed(4)
    sa, sv, ta, tv = (torch.randn(5, 12, generator=g) for _ in range(4))
    expected = (2 - 2 * F.cosine_similarity(sa, ta)).mean() + (2 - 2 * F.cosine_similarity(sv, tv)).mean()
    torch.testing.assert_close(distillation_loss(sa, sv, ta, tv, normalize=True), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_distillation_never_reaches_teacher(normalize: bool) -> None:
    g = torch.Generator().manual_seed(5)
    sa, sv, ta, tv = (torch.randn(3, 8, generator=g).requires_grad_() for _ in range(4))
    distillation_loss(sa, sv, ta, tv, normalize=normalize).backward()
    assert ta.grad is None and tv.grad is None
    assert sa.grad is not None and sv.grad is not None and sa.grad.abs().sum() > 0
    if not normalize:  # d/ds mean_b ||s - t||^2 = 2 (s - t) / B
        torch.testing.assert_close(sa.grad, 2 * (sa - ta).detach() / 3)


# ---------------------------------------------------------------- two real ranks (gloo, CPU)

WORLD, B, D_IN, D_EMB = 2, 4, 6, 16


def _model_and_data() -> tuple[torch.nn.Linear, torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """Identical weights on every process; the GLOBAL batch of 2B inputs (rank r owns rows r*B..)."""
    torch.manual_seed(0)
    lin_a, lin_v = torch.nn.Linear(D_IN, D_EMB), torch.nn.Linear(D_IN, D_EMB)
    g = torch.Generator().manual_seed(1)
    x_a = torch.randn(WORLD * B, D_IN, generator=g)
    x_v = x_a + 0.7 * torch.randn(WORLD * B, D_IN, generator=g)  # correlated pairs: a non-trivial loss
    return lin_a, lin_v, x_a, x_v


def _embed(lin_a: torch.nn.Linear, lin_v: torch.nn.Linear, x_a: torch.Tensor, x_v: torch.Tensor):
    emb_a = lin_a(x_a)
    emb_v = (lin_v.weight @ x_v.T + lin_v.bias[:, None]).T  # deliberately NON-contiguous [B, D]
    emb_a.retain_grad()
    emb_v.retain_grad()
    return emb_a, emb_v


def _rank_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store, not a TCP port: concurrent test runs on one machine can never meet by accident.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    passed = False
    try:
        lin_a, lin_v, x_a, x_v = _model_and_data()
        rows = slice(rank * B, (rank + 1) * B)
        emb_a, emb_v = _embed(lin_a, lin_v, x_a[rows], x_v[rows])
        assert not emb_v.is_contiguous()
        loss, acc = info_nce(emb_a, emb_v, TAU, check_batch_size=True)
        loss.backward()
        params = {f"a.{k}": p for k, p in lin_a.named_parameters()} | {f"v.{k}": p for k, p in lin_v.named_parameters()}
        grads = {}
        for name, p in params.items():  # what DDP/FSDP do: average the gradients over ranks
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            grads[name] = p.grad / WORLD
        stats = torch.stack([loss.detach(), acc])
        local_stats = stats.clone()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        with torch.no_grad():
            gathered_v = gather_with_grad(emb_v)
        try:  # unequal batches: every rank must get the same clear error, not a gloo abort
            info_nce(emb_a[: B - rank], emb_v[: B - rank], TAU, check_batch_size=True)
            mismatch = "no error"
        except ValueError as e:
            mismatch = str(e)
        torch.save({"mean_stats": stats / WORLD, "local_stats": local_stats, "param_grads": grads,
                    "emb_a_grad": emb_a.grad, "emb_v_grad": emb_v.grad, "gathered_v": gathered_v,
                    "mismatch": mismatch}, Path(out_dir) / f"rank{rank}.pt")
        passed = True
    finally:
        end_worker(passed)


@pytest.mark.timeout(180)
def test_two_ranks_match_global_batch(tmp_path: Path) -> None:
    """2 gloo ranks with different data == one process on the concatenated batch (B_total = 2B).

    Gradient-scale facts checked here (documented in info_nce):
    * DDP-averaged parameter gradients == gradients of the single-process global loss;
    * the mean of the per-rank losses == the global loss;
    * rank r's gradient w.r.t. its own embeddings == WORLD x the global-loss gradient of those rows
      (the gather's reduce-scatter sums the gradients of all WORLD rank losses, each a mean over B
      rows, whereas the global loss is a mean over WORLD*B rows); DDP's 1/WORLD cancels the factor.
    """
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    lin_a, lin_v, x_a, x_v = _model_and_data()
    emb_a, emb_v = _embed(lin_a, lin_v, x_a, x_v)
    ref = _naive_symmetric(emb_a, emb_v)
    ref.backward()
    ref_loss_lib, ref_acc = info_nce(emb_a.detach(), emb_v.detach(), TAU, distributed=False)
    torch.testing.assert_close(ref_loss_lib, ref.detach(), rtol=1e-6, atol=1e-6)
    ref_grads = {f"a.{k}": p.grad for k, p in lin_a.named_parameters()} | {
        f"v.{k}": p.grad for k, p in lin_v.named_parameters()}

    # Asymmetric inputs really give the ranks different losses (otherwise the test proves little).
    assert abs(ranks[0]["local_stats"][0] - ranks[1]["local_stats"][0]) > 1e-3
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["mean_stats"][0], ref.detach(), rtol=1e-6, atol=1e-6)
        assert res["mean_stats"][1].item() == pytest.approx(ref_acc.item())
        for name, g in ref_grads.items():
            torch.testing.assert_close(res["param_grads"][name], g, rtol=1e-5, atol=1e-6, msg=f"rank {r} {name}")
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(res["emb_a_grad"], WORLD * emb_a.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["emb_v_grad"], WORLD * emb_v.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["gathered_v"], emb_v.detach(), rtol=1e-6, atol=1e-6)
        assert "same batch size on every rank" in res["mismatch"] and "[4, 3]" in res["mismatch"]
