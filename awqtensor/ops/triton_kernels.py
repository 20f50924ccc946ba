"""Triton kernels for the ``"triton"`` weight layout (see ``awqtensor.packing``).

Layout: ``qweight`` int32 [K_padded / 8, N]; word (w, n) holds the codes of columns
8w .. 8w + 7 of output row n, column 8w + i in bits 4i .. 4i + 3. It is the "plain"
bytes read as little-endian int32 and transposed, so a tile [BLOCK_K, BLOCK_N] of
weights is BLOCK_K / 8 rows of coalesced words. ``scales`` and ``zeros`` stay [N, G].

Three kernels, all accumulating in fp32:

* ``gemv``: one program per (BLOCK_N outputs, row of x, K slice); each multiplies a
  dequantized [BLOCK_K, BLOCK_N] tile by a column of x and reduces over K. With
  ``split_k > 1`` the K slices land in an fp32 [split_k, M, N] buffer summed afterwards
  (a fixed order, so every row's result is independent of the other rows).
* ``gemm``: tiles [BLOCK_M, BLOCK_N], dequantizing each [BLOCK_K, BLOCK_N] weight tile
  in the main loop and feeding ``tl.dot``.
* ``dequantize``: the weight [N, K] in the activation dtype, for a dense matmul at large M.

BLOCK_K divides the group size, so each K tile reads one scale per column. The input's
columns past K load as 0, which is what the padded weight columns multiply.
Under ``TRITON_INTERPRET=1`` (CPU tensors) the dot runs in fp32: the interpreter's
``tl.dot`` on bf16 is wrong.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dequantized_tile(w_ptr, s_ptr, z_ptr, k0, rn, N, G,
                      GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_N] fp32 weights of columns k0 .. k0 + BLOCK_K, rows ``rn``."""
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    words = tl.load(w_ptr + ((k0 + rk) // 8)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
    q = ((words >> ((rk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
    g = k0 // GROUP
    s = tl.load(s_ptr + rn * G + g, mask=n_ok, other=0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + rn * G + g, mask=n_ok, other=0).to(tl.float32)
        w = (q - z[None, :]) * s[None, :]
    else:
        w = (q - 8.0) * s[None, :]
    return w


@triton.jit
def _accumulate(acc, x, w, a_ptr, k, K, HAS_ACT: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc + (x * act_scale[k]) @ w`` for one [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tile:
    the GEMM main loop's step, shared with the grouped MoE kernel."""
    if HAS_ACT:
        a = tl.load(a_ptr + k, mask=k < K, other=0)
        x = (x.to(tl.float32) * a.to(tl.float32)[None, :]).to(x.dtype)
    if DOT_FP32:
        return acc + tl.dot(x.to(tl.float32), w)
    return acc + tl.dot(x, w.to(x.dtype))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, a_ptr, b_ptr, y_ptr,
                 N, K, K_PADDED, G, stride_xm, stride_ys, stride_ym,
                 GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(pid_k * BLOCK_K, K_PADDED, BLOCK_K * SPLIT_K):
        k = k0 + rk
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0).to(tl.float32)
        if HAS_ACT:
            x = x * tl.load(a_ptr + k, mask=k < K, other=0).to(tl.float32)
        w = _dequantized_tile(w_ptr, s_ptr, z_ptr, k0, rn, N, G, GROUP, HAS_ZEROS, BLOCK_K)
        acc += tl.sum(x[:, None] * w, axis=0)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0).to(tl.float32)
    tl.store(y_ptr + pid_k * stride_ys + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, a_ptr, b_ptr, y_ptr,
                 M, N, K, K_PADDED, G, stride_xm, stride_ym,
                 GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K_PADDED, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0)
        w = _dequantized_tile(w_ptr, s_ptr, z_ptr, k0, rn, N, G, GROUP, HAS_ZEROS, BLOCK_K)
        acc = _accumulate(acc, x, w, a_ptr, k, K, HAS_ACT, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, a_ptr, out_ptr, N, K, G,
                       GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_ACT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    k0 = pid_k * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequantized_tile(w_ptr, s_ptr, z_ptr, k0, rn, N, G, GROUP, HAS_ZEROS, BLOCK_K)
    if HAS_ACT:
        w = w * tl.load(a_ptr + k, mask=k < K, other=0).to(tl.float32)[:, None]
    tl.store(out_ptr + rn[None, :] * K + k[:, None], w.to(out_ptr.dtype.element_ty),
             mask=(k[:, None] < K) & (rn[None, :] < N))


def block_k_for(group_size: int) -> int:
    """The K tile: the largest power of two <= 128 dividing ``group_size`` (>= 16 required)."""
    block = 128
    while group_size % block:
        block //= 2
    return block


def _common(qweight, scales, zeros, act_scale, group_size):
    n, g = scales.shape
    dummy = scales  # never read: the HAS_* flag is off
    return dict(w_ptr=qweight, s_ptr=scales, z_ptr=dummy if zeros is None else zeros,
                a_ptr=dummy if act_scale is None else act_scale, N=n, G=g,
                GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_ACT=act_scale is not None)


def gemv(x2, qweight, scales, zeros, act_scale, bias, group_size, *, block_n=64, block_k=None, split_k=1):
    """x2 [M, K] (contiguous rows) -> [M, N] in x2.dtype."""
    m, k = x2.shape
    n, g = scales.shape
    block_k = min(block_k or 128, block_k_for(group_size))
    k_padded = g * group_size
    split_k = max(1, min(split_k, k_padded // block_k))
    y = torch.empty((split_k, m, n), device=x2.device, dtype=x2.dtype if split_k == 1 else torch.float32)
    grid = (triton.cdiv(n, block_n), m, split_k)
    _gemv_kernel[grid](x_ptr=x2, b_ptr=scales if bias is None else bias, y_ptr=y, K=k, K_PADDED=k_padded,
                       stride_xm=x2.stride(0), stride_ys=y.stride(0), stride_ym=y.stride(1),
                       HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_N=block_n, BLOCK_K=block_k,
                       **_common(qweight, scales, zeros, act_scale, group_size))
    return y[0] if split_k == 1 else y.sum(0).to(x2.dtype)


def gemm(x2, qweight, scales, zeros, act_scale, bias, group_size, *, block_m=32, block_n=64, block_k=None,
         num_warps=4, num_stages=2):
    """x2 [M, K] (contiguous rows) -> [M, N] in x2.dtype."""
    m, k = x2.shape
    n, g = scales.shape
    block_k = min(block_k or 64, block_k_for(group_size))
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    extra = {} if interpreting() else dict(num_warps=num_warps, num_stages=num_stages)
    _gemm_kernel[grid](x_ptr=x2, b_ptr=scales if bias is None else bias, y_ptr=y, M=m, K=k, K_PADDED=g * group_size,
                       stride_xm=x2.stride(0), stride_ym=y.stride(0), HAS_BIAS=bias is not None,
                       DOT_FP32=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       **_common(qweight, scales, zeros, act_scale, group_size), **extra)
    return y


def dequantize(qweight, scales, zeros, act_scale, group_size, in_features, dtype, *, block_n=64):
    """The weight [N, in_features] in ``dtype``."""
    n, g = scales.shape
    block_k = block_k_for(group_size)
    out = torch.empty((n, in_features), device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(n, block_n))
    _dequantize_kernel[grid](out_ptr=out, K=in_features, BLOCK_N=block_n, BLOCK_K=block_k,
                             **_common(qweight, scales, zeros, act_scale, group_size))
    return out
