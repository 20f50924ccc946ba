"""A grouped int4 GEMM for mixtures of experts: every routed expert's rows in one launch.

The experts' weights are stacked in the ``"triton"`` layout (``triton_kernels``):
``qweight`` int32 [E, K_padded / 8, N], ``scales`` and ``zeros`` [E, N, G], ``act_scale``
[E, K]. The rows to multiply are gathered by ``routing``: positions are grouped by
expert and each expert's run is padded to a whole number of BLOCK_M rows, so that a
BLOCK_M tile belongs to one expert (``block_experts``); a padded position holds row -1:
nothing is read for it and its output row is 0.

    rows           int32 [P]          the input row at each position, or -1
    block_experts  int32 [P / BLOCK_M]  the expert of each BLOCK_M tile
    y              [P, N]             y[p] = x[rows[p]] @ W[e(p)]^T (0 where rows[p] < 0)

One program per (BLOCK_M tile, BLOCK_N outputs); the main loop is the GEMM kernel's,
with the weight pointers offset to the tile's expert. Under ``TRITON_INTERPRET=1`` the
dot runs in fp32, as in ``triton_kernels``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import _accumulate, _dequantized_tile, block_k_for, interpreting

BLOCK_M = 16  # rows per tile, and the unit each expert's run of positions is padded to


@triton.jit
def _grouped_gemm_kernel(x_ptr, rows_ptr, experts_ptr, w_ptr, s_ptr, z_ptr, a_ptr, y_ptr,
                         # sizes, and the strides of x, y and of one expert's stacked tensors
                         N, K, K_PADDED, G, stride_xm, stride_ym, stride_we, stride_se, stride_ae,
                         GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_ACT: tl.constexpr,
                         DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(experts_ptr + pid_m).to(tl.int64)
    positions = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + positions)
    used = rows >= 0
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_e, s_e = w_ptr + expert * stride_we, s_ptr + expert * stride_se
    z_e, a_e = z_ptr + expert * stride_se, a_ptr + expert * stride_ae
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K_PADDED, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k[None, :],
                    mask=used[:, None] & (k[None, :] < K), other=0)
        w = _dequantized_tile(w_e, s_e, z_e, k0, rn, N, G, GROUP, HAS_ZEROS, BLOCK_K)
        acc = _accumulate(acc, x, w, a_e, k, K, HAS_ACT, DOT_FP32)
    # padded positions store their zeros: the output is defined everywhere
    tl.store(y_ptr + positions[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rn[None, :] < N)


def routing(top_k_index: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """(rows, block_experts, pairs) for ``top_k_index`` [T, k]: the token at each position
    (-1 where padded), each tile's expert, and the flat (token, slot) pair at each position
    (-1 where padded), positions grouped by expert and padded per expert to ``block_m``."""
    flat = top_k_index.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert]
    position = starts[expert] + rank
    total = int(padded.sum())
    pairs = torch.full((total,), -1, dtype=torch.int64, device=flat.device)
    pairs[position] = order
    rows = torch.where(pairs >= 0, pairs // top_k_index.shape[-1], -1).to(torch.int32)
    block_experts = torch.repeat_interleave(torch.arange(num_experts, device=flat.device, dtype=torch.int32),
                                            padded // block_m)
    return rows, block_experts, pairs


def grouped_gemm(x2, rows, block_experts, qweight, scales, zeros, act_scale, group_size, *,
                 block_m=BLOCK_M, block_n=64, block_k=None, num_warps=4, num_stages=2):
    """x2 [M, K] (contiguous rows), stacked expert weights -> [P, N] in x2.dtype (zero rows
    at padded positions)."""
    assert x2.dim() == 2 and x2.stride(1) == 1, "x2 must be [M, K] with contiguous rows"
    assert qweight.dim() == 3 and scales.dim() == 3, "qweight [E, K/8, N] and scales [E, N, G] are stacked"
    assert rows.numel() == block_experts.numel() * block_m, "one expert per block_m positions"
    _, n, g = scales.shape
    block_k = min(block_k or 64, block_k_for(group_size))
    y = torch.empty((rows.numel(), n), device=x2.device, dtype=x2.dtype)
    if rows.numel() == 0:
        return y
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    extra = {} if interpreting() else dict(num_warps=num_warps, num_stages=num_stages)
    dummy = scales  # never read: the HAS_* flag is off
    _grouped_gemm_kernel[grid](
        x_ptr=x2, rows_ptr=rows, experts_ptr=block_experts, w_ptr=qweight, s_ptr=scales,
        z_ptr=dummy if zeros is None else zeros, a_ptr=dummy if act_scale is None else act_scale, y_ptr=y,
        N=n, K=x2.shape[1], K_PADDED=g * group_size, G=g, stride_xm=x2.stride(0), stride_ym=y.stride(0),
        stride_we=qweight.stride(0), stride_se=scales.stride(0),
        stride_ae=0 if act_scale is None else act_scale.stride(0),
        GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_ACT=act_scale is not None, DOT_FP32=interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **extra)
    return y
