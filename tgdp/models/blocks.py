"""The CAV-MAE Transformer `Block` (docs/method.md 1.3): pre-norm attention + MLP with THREE LayerNorm sets.

Every block owns `norm1/norm2` (default and joint stream), `norm1_a/norm2_a` (audio stream of the
unified layer) and `norm1_v/norm2_v` (visual stream), so unused norms exist in every block's state
dict exactly as in the official checkpoints. Key names follow the official ones: `attn.qkv`,
`attn.proj`, `mlp.fc1`, `mlp.fc2`. No dropout or drop-path (all 0 in every released config).

Attention runs through `F.scaled_dot_product_attention` (a fused kernel where one exists). The
teacher needs, in addition, the patch-to-CLS attention COLUMN p(i -> 0) of one block
(`Block.forward(..., return_cls_attention=True)`); `Attention.forward_with_cls_column` explains how
it comes out of the same fused call without ever building the [B, H, L, L] map.

Two ways to do less work, both exact (same outputs as the plain call, up to float summation order):

* `segments`: x holds several independent sequences side by side along the token axis (e.g. the
  reconstruction AND the contrastive view of the same clip). Per-token work (LayerNorms, qkv,
  proj, MLP) runs as ONE set of GEMMs over all of them; attention runs per segment, so no token
  sees another segment. Bigger GEMMs run closer to peak (on a 2-core CPU a [240, 768] x [768, 3072]
  GEMM reaches ~60 % of the rate of a [1600, 768] one) and a sharded block is gathered once, not
  once per pass.
* `cls_only`: only the first token's output is wanted (the last block of a pass whose result is
  the CLS vector): the qkv projection runs for every token, the attention, the projection and
  the MLP for token 0 alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Extra value channels appended for the CLS-column trick: one carries the indicator of key 0, the
# rest pad the head width to a multiple of 8 so that every SDPA backend (flash, memory-efficient,
# cuDNN, CPU flash) accepts the call with equal q / k / v widths.
_COLUMN_PAD = 8


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, L, d]
        return q, k, v

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        B, H, L, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, L, H * d))

    def forward(self, x: torch.Tensor, segments: tuple[int, ...] | None = None,
                cls_only: bool = False) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]; [B, 1, D] (query 0 only) with cls_only; per-segment attention with
        segments (lengths along L that sum to L)."""
        if cls_only:
            if segments is not None:
                raise ValueError("cls_only attends from token 0 of ONE sequence; it takes no segments")
            return self._cls_query(x)
        q, k, v = self._qkv(x)
        if segments is None:
            return self._merge(F.scaled_dot_product_attention(q, k, v))
        if sum(segments) != x.shape[1]:
            raise ValueError(f"segments {segments} do not add up to the {x.shape[1]} tokens")
        # Each segment's output is merged to [B, L_s, D] first: the fused kernels return a token-major
        # layout for which that merge is a view, so the concatenation is the only copy.
        outs = [F.scaled_dot_product_attention(qs, ks, vs)
                for qs, ks, vs in zip(q.split(segments, 2), k.split(segments, 2), v.split(segments, 2))]
        return self.proj(torch.cat([o.transpose(1, 2).flatten(2) for o in outs], dim=1))

    def _cls_query(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output of token 0 only, [B, 1, D].

        The fused qkv projection still runs for every token (k and v need them; the q rows of the
        other tokens are the only waste, 1/3 of one GEMM): slicing `qkv.weight` instead would
        bypass the module call through which ZeRO-3 gathers a partitioned weight.
        """
        q, k, v = self._qkv(x)
        return self._merge(F.scaled_dot_product_attention(q[:, :, :1], k, v))

    def forward_with_cls_column(self, x: torch.Tensor, cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output [B, L, D] ([B, 1, D] with cls_only) and the column
        p[b, h, i] = softmax_j(q_i k_j s)[j = 0], [B, H, L].

        How: append to every value vector an indicator channel that is 1 for key 0 and 0 for all
        other keys. Attention output channel d is then sum_j p_ij * [j = 0] = p_i0, the wanted
        column, computed by the same fused SDPA call that produces the block output (q and k are
        zero-padded to the same width, which leaves every dot product unchanged; `scale` is passed
        explicitly so the padding does not alter it).
        Cost: the head width grows from d to d + 8 (64 -> 72 for ViT-B), i.e. ~12.5% more attention
        FLOPs in this ONE block, plus O(B H L) memory for the column. The explicit alternative of
        the official code materialises and soft-maxes the full [B, H, L, L] map (209 x 209 x 12 per
        audio clip) and runs a non-fused matmul. Precision: the column has the precision of the
        attention output (bf16 under autocast), like the official map under autocast.
        """
        q, k, v = self._qkv(x)
        B, H, L, d = v.shape
        indicator = v.new_zeros(B, H, L, _COLUMN_PAD)
        indicator[:, :, 0, 0] = 1.0  # value channel d is 1 for key 0 only
        pad = (0, _COLUMN_PAD)
        o = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), torch.cat([v, indicator], dim=-1),
                                           scale=self.scale)  # [B, H, L, d + 8]
        rows = o[:, :, :1] if cls_only else o
        return self._merge(rows[..., :d]), o[..., d]

    def forward_with_attention_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official explicit path: output [B, L, D] and the post-softmax map [B, H, L, L].

        Kept only for the reference implementation and tests (O(L^2) memory, unfused).
        """
        q, k, v = self._qkv(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self._merge(attn @ v), attn


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that keeps a bf16 input in bf16 under autocast (same parameters, same keys).

    Autocast runs every LayerNorm in fp32 and returns fp32, which turns a bf16 token stream back
    into fp32: the residual adds, casts and norms then move twice the bytes, and on a GPU those
    bandwidth-bound kernels cost as much as the GEMMs (docs/benchmarks.md). With a bf16 input this
    normalises in bf16 (the kernel still accumulates the statistics in fp32), exactly as the norm
    does under FSDP2's bf16 compute copies. An fp32 input takes the plain path (fp32 under autocast
    too), so a model whose stream stays fp32 computes what it always did.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and self.weight.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype), self.eps)
        return super().forward(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm's default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x <- x + Attn(LN1(x)); x <- x + MLP(LN2(x)); (LN1, LN2) picked by `modality`.

    modality 'a' -> (norm1_a, norm2_a), 'v' -> (norm1_v, norm2_v), anything else -> (norm1, norm2).
    Registration order matches the official class so state dicts list keys in the same order.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.norm1_a = LayerNorm(dim, eps=eps)
        self.norm1_v = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.norm2_a = LayerNorm(dim, eps=eps)
        self.norm2_v = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _norms(self, modality: str | None) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        if modality == "a":
            return self.norm1_a, self.norm2_a
        if modality == "v":
            return self.norm1_v, self.norm2_v
        return self.norm1, self.norm2

    def forward(self, x: torch.Tensor, modality: str | None = None, return_cls_attention: bool = False,
                segments: tuple[int, ...] | None = None,
                cls_only: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Block output [B, L, D] ([B, 1, D], token 0 only, with cls_only; per-segment attention with
        segments, see the module docstring); with return_cls_attention also s [B, L-1], the head-mean
        patch-to-CLS attention s[b, i] = mean_h p[b, h, 1+i, 0] (how much patch i, as query, attends
        to the CLS token at key 0: the official `attn[:, :, 1:, 0].mean(1)`) without the [B, H, L, L]
        map. Everything goes through `forward` so per-block wrappers (fully_shard, compile,
        activation checkpointing), which hook `forward` only, also cover these calls.
        """
        n1, n2 = self._norms(modality)
        if return_cls_attention:
            if segments is not None:
                raise ValueError("return_cls_attention takes one sequence, not segments")
            y, column = self.attn.forward_with_cls_column(n1(x), cls_only=cls_only)
        else:
            y = self.attn(n1(x), segments=segments, cls_only=cls_only)
        x = (x[:, :1] if cls_only else x) + y
        x = x + self.mlp(n2(x))
        return (x, column[:, :, 1:].mean(dim=1)) if return_cls_attention else x

    def forward_with_attention_map(self, x: torch.Tensor, modality: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference path: block output and the explicit attention map [B, H, L, L] (not FSDP-hooked)."""
        n1, n2 = self._norms(modality)
        y, attn = self.attn.forward_with_attention_map(n1(x))
        x = x + y
        return x + self.mlp(n2(x)), attn
