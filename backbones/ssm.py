"""The selective scan and causal depthwise conv of Mamba: CUDA kernels when present, PyTorch otherwise.

Semantics (mamba-ssm's `selective_scan_ref`, fp32): dt = softplus(delta + delta_bias);
h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; y_t = sum_n h_t C_t + D u_t; out = y * silu(z).
On CUDA tensors the kernels of `mamba-ssm` and `causal-conv1d` are used when they import (they are
imported lazily: neither imports without CUDA). Elsewhere the scan is a sequential loop with a
hand-written reverse-scan backward (`SelectiveScan`), which recomputes the states in the backward
instead of keeping them, and uses no cumsum-of-exp tricks (they overflow when dt is large).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def cuda_kernels():
    """(selective_scan_fn, causal_conv1d_fn) from mamba-ssm / causal-conv1d, or None."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built without CUDA
        return None
    return selective_scan_fn, causal_conv1d_fn


def _states(u, dt, A, B, C):
    """All hidden states h_t, time-major (l, b, d, n), the decays exp(dt_t A) (l, b, d, n) and the outputs
    sum_n h_t C_t (b, d, l)."""
    time_major = dt.permute(2, 0, 1).contiguous().unsqueeze(-1)  # (l, b, d, 1): contiguous steps below
    dA = torch.exp(time_major * A)  # (l, b, d, n)
    hs = (time_major * u.permute(2, 0, 1).unsqueeze(-1)) * B.permute(2, 0, 1).unsqueeze(2)  # dt B u, then h
    for t in range(1, hs.shape[0]):
        hs[t].addcmul_(dA[t], hs[t - 1])
    y = torch.einsum("lbdn,bnl->bdl", hs, C)
    return hs, dA, y


class SelectiveScan(torch.autograd.Function):
    """Sequential selective scan with a reverse-scan backward. Shapes: u, delta, z (b, d, l); A (d, n);
    B, C (b, n, l); D, delta_bias (d)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias):
        dtype = torch.promote_types(u.dtype, torch.float32)  # fp32 at least (float64 for gradcheck)
        u, delta, A, B, C, D, z = (t.to(dtype) for t in (u, delta, A, B, C, D, z))
        pre = delta + delta_bias.to(dtype)[:, None] if delta_bias is not None else delta
        dt = F.softplus(pre)
        _, _, y = _states(u, dt, A, B, C)
        y = y + u * D[:, None]
        ctx.save_for_backward(u, pre, A, B, C, D, z)
        ctx.has_bias = delta_bias is not None
        return y * F.silu(z)

    @staticmethod
    def backward(ctx, g):
        u, pre, A, B, C, D, z = ctx.saved_tensors
        dt = F.softplus(pre)
        hs, dA, y = _states(u, dt, A, B, C)  # recomputed: nothing of size (l, b, d, n) is kept between passes
        y = y + u * D[:, None]
        sig = torch.sigmoid(z)
        dz = g * y * sig * (1 + z * (1 - sig))
        gy = g * z * sig  # dL/dy
        dD = (gy * u).sum((0, 2))
        du = gy * D[:, None]
        dC = torch.einsum("bdl,lbdn->bnl", gy, hs)
        # reverse scan: lam_t = dL/dh_t = gy_t C_t + exp(dt_{t+1} A) lam_{t+1}
        lam = gy.permute(2, 0, 1).contiguous().unsqueeze(-1) * C.permute(2, 0, 1).unsqueeze(2)  # (l, b, d, n)
        for t in range(lam.shape[0] - 2, -1, -1):
            lam[t].addcmul_(dA[t + 1], lam[t + 1])
        # dL/d(dt_t A) = lam_t h_{t-1} exp(dt_t A); dL/d(dt_t B_t u_t) = lam_t
        dAdt = torch.zeros_like(hs)
        torch.mul(lam[1:] * hs[:-1], dA[1:], out=dAdt[1:])
        Bt = B.permute(2, 0, 1).unsqueeze(2)  # (l, b, 1, n)
        lamB = (lam * Bt).sum(-1).permute(1, 2, 0)  # (b, d, l)
        ddt = (dAdt * A).sum(-1).permute(1, 2, 0) + lamB * u
        dA_param = torch.einsum("lbdn,bdl->dn", dAdt, dt)
        dB = torch.einsum("lbdn,bdl->bnl", lam, dt * u)
        du = du + lamB * dt
        dpre = ddt * torch.sigmoid(pre)
        dbias = dpre.sum((0, 2)) if ctx.has_bias else None
        return du, dpre, dA_param, dB, dC, dD, dz, dbias


def selective_scan(u, delta, A, B, C, D, z, delta_bias=None):
    """out (b, d, l) = selective scan with softplus on delta, gated by silu(z)."""
    kernels = cuda_kernels() if u.is_cuda else None
    if kernels is not None:
        return kernels[0](u, delta, A, B.unsqueeze(1).contiguous(), C.unsqueeze(1).contiguous(), D.float(), z,
                          delta_bias=delta_bias, delta_softplus=True)
    return SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias)


def causal_conv1d(x, weight, bias):
    """SiLU(causal depthwise conv) of x (b, d, l) with weight (d, 1, k)."""
    kernels = cuda_kernels() if x.is_cuda else None
    if kernels is not None:
        return kernels[1](x, weight.squeeze(1), bias, activation="silu")
    k = weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]])
