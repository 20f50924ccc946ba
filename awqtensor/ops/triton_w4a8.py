"""The Triton W4A8 GEMM: int8 activations x int4 weights through ``tl.dot`` on int8 tiles.

Weights in the ``"triton"`` layout (``triton_kernels.py``); activations quantized per row
and weight group beforehand (``w4a8.quantize_activations``: int8 codes [M, K_padded] and
their scales [M, G]). Per output tile and group, the codes minus the zero point (-15..15)
are unpacked to int8 in registers, the group's products accumulate exactly in int32, and
the group's sum is rescaled into the fp32 accumulator by ``d[m, g] * s[n, g]``.

Under ``TRITON_INTERPRET=1`` the dot runs in fp32 on the same integers (exact: a group's
partial sums stay below 2^24), since the interpreter's integer dot is not what a GPU runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import block_k_for, interpreting


@triton.jit
def _w4a8_kernel(xq_ptr, d_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                 M, N, G, stride_xm, stride_ym,
                 GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g in range(0, G):
        if HAS_ZEROS:
            z = tl.load(z_ptr + rn * G + g, mask=n_ok, other=0).to(tl.int32)
        else:
            z = tl.full((BLOCK_N,), 8, tl.int32)
        dots = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        for k0 in range(g * GROUP, (g + 1) * GROUP, BLOCK_K):
            k = k0 + rk
            x = tl.load(xq_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0)
            words = tl.load(w_ptr + (k // 8)[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
            q = ((words >> ((rk % 8) * 4)[:, None]) & 0xF) - z[None, :]
            if DOT_FP32:
                dots += tl.dot(x.to(tl.float32), q.to(tl.float32)).to(tl.int32)
            else:
                dots = tl.dot(x, q.to(tl.int8), dots, out_dtype=tl.int32)
        d = tl.load(d_ptr + rm * G + g, mask=m_ok, other=0)
        s = tl.load(s_ptr + rn * G + g, mask=n_ok, other=0).to(tl.float32)
        acc += dots.to(tl.float32) * d[:, None] * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def w4a8_gemm(xq, d, qweight, scales, zeros, bias, group_size, dtype, *, block_m=64, block_n=64, block_k=None,
              num_warps=4, num_stages=3):
    """xq int8 [M, K_padded], d fp32 [M, G] -> [M, N] in ``dtype``."""
    m = xq.shape[0]
    n, g = scales.shape
    block_k = min(block_k or 64, block_k_for(group_size))
    y = torch.empty((m, n), device=xq.device, dtype=dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    extra = {} if interpreting() else dict(num_warps=num_warps, num_stages=num_stages)
    _w4a8_kernel[grid](xq, d, qweight, scales, scales if zeros is None else zeros, scales if bias is None else bias, y,
                       m, n, g, xq.stride(0), y.stride(0), GROUP=group_size, HAS_ZEROS=zeros is not None,
                       HAS_BIAS=bias is not None, DOT_FP32=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n,
                       BLOCK_K=block_k, **extra)
    return y
