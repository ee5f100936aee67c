"""The selective scan and causal depthwise conv of Mamba, with nothing compiled required.

Semantics (mamba-ssm's `selective_scan_ref`, fp32): dt = softplus(delta + delta_bias);
h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; y_t = sum_n h_t C_t + D u_t; out = y * silu(z).

Backends (`selective_scan` picks one per device type, says which once on stderr, `backend()` tells it):
- `mamba`: the CUDA kernels of mamba-ssm and causal-conv1d (imported lazily: neither imports without CUDA);
- `triton`: our Triton kernels (`ssm_triton.py`; Triton ships with CUDA builds of torch), the conv by F.conv1d;
- `torch`: `ChunkedScan`, plain PyTorch on any device: the time axis is cut into chunks of `CHUNK` steps; per
  chunk, large tensor operations compute the decays and inputs, a short loop the states, one batched matmul
  the outputs; the backward recomputes each chunk's states from the state saved at its start (nothing of size
  (b, d, l, n) is kept) and runs the reverse scan. Only products of decays exp(dt A) <= 1 are formed: no
  cumsum-of-exp (which overflows when dt is large).
`auto` (the default) = mamba when its kernels import, else triton, on CUDA tensors; torch elsewhere. Force one
with `set_backend(name)` or VTAB_LILY_SCAN=name (`run` / `sweep --scan-backend`); a forced backend that cannot
run raises ScanBackendError with one line saying why.
Any state size n (A's columns) runs on every backend (a method such as `addscan` widens Vim's 16 to 22), up to
each one's limit: mamba-ssm's kernels take n <= 256 (`TORCH_CHECK(dstate <= 256)` in its
csrc/selective_scan/selective_scan.cpp, forward and backward), the Triton kernels a state block within Triton's
largest tensor (`ssm_triton.check_state`); past it the chosen backend raises ScanBackendError, never another
backend silently.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F

from .errors import UserError

BACKENDS = ("auto", "mamba", "triton", "torch")
MAMBA_MAX_STATE = 256  # mamba-ssm's selective_scan_fwd / _bwd: TORCH_CHECK(dstate <= 256)
CHUNK = 16  # time steps per chunk of the torch scan (8 to 64 timed alike on a 2-core CPU, Vim-S mixer)


class ScanBackendError(UserError, RuntimeError):
    """A forced scan backend cannot run here (the message says why and what to do)."""


_requested = {"name": os.environ.get("VTAB_LILY_SCAN", "auto")}


def set_backend(name: str) -> None:
    """Force the scan backend (`auto` restores the automatic choice)."""
    if name not in BACKENDS:
        raise ScanBackendError(f"unknown scan backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _requested["name"] = name
    backend.cache_clear()


@functools.cache
def cuda_kernels():
    """((selective_scan_fn, causal_conv1d_fn) or None, why not) from mamba-ssm / causal-conv1d."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # not installed, built without CUDA, or built for another torch
        return None, f"{type(e).__name__}: {e}"
    return (selective_scan_fn, causal_conv1d_fn), ""


@functools.cache
def triton_scan():
    """(the ssm_triton module or None, why not)."""
    try:
        from . import ssm_triton
    except Exception as e:  # Triton missing (CPU-only torch builds) or broken
        return None, f"{type(e).__name__}: {e}"
    return ssm_triton, ""


def choose(device_type: str, requested: str) -> tuple[str, str]:
    """(backend, why) for tensors on `device_type`; ScanBackendError when a forced backend cannot run."""
    if requested not in BACKENDS:
        raise ScanBackendError(f"unknown scan backend {requested!r} (VTAB_LILY_SCAN); choose one of "
                               f"{', '.join(BACKENDS)}")
    cuda = device_type == "cuda"
    if requested == "torch":
        return "torch", "forced"
    if requested == "auto" and not cuda:
        return "torch", f"{device_type} tensors"
    kernels, kernels_missing = cuda_kernels() if cuda else (None, "")
    if requested == "mamba":
        if not cuda or kernels is None:
            why = f"the kernels do not import ({kernels_missing})" if cuda else f"tensors on {device_type}, not CUDA"
            raise ScanBackendError(f"scan backend mamba cannot run: {why}; install mamba-ssm and causal-conv1d on "
                                   "a CUDA machine (pip install --no-build-isolation -e '.[mamba]') or choose "
                                   "triton or torch")
        return "mamba", "forced"
    if requested == "auto" and kernels is not None:
        return "mamba", "mamba-ssm kernels import"
    module, triton_missing = triton_scan()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter runs kernels on the CPU
    if module is not None and (cuda or interpreted):
        return "triton", "forced" if requested == "triton" else f"mamba-ssm kernels do not import ({kernels_missing})"
    if requested == "triton":
        why = triton_missing or f"tensors on {device_type}, not CUDA (set TRITON_INTERPRET=1 for the interpreter)"
        raise ScanBackendError(f"scan backend triton cannot run: {why}; choose torch (or auto)")
    return "torch", f"neither mamba-ssm ({kernels_missing}) nor Triton ({triton_missing}) imports"


def chosen(device_type: str) -> tuple[str, str]:
    """The backend that tensors on `device_type` will use and why, as `choose` (silent)."""
    return choose(device_type, _requested["name"])


@functools.cache
def backend(device_type: str) -> tuple[str, str]:
    """The backend used for tensors on `device_type` and why; said once on stderr per device type."""
    name, why = chosen(device_type)
    print(f"selective scan on {device_type}: {name} ({why})", file=sys.stderr, flush=True)
    return name, why


def _chunk_states(dA, hs, dt, dtu, B, A, h0) -> None:
    """One chunk's decays and states, time-major (k, b, d, n), in place: dA = exp(dt A);
    hs_t = dA_t hs_{t-1} + dt_t u_t B_t with hs_{-1} = h0."""
    torch.mul(dt.unsqueeze(-1), A, out=dA).exp_()
    torch.mul(dtu.unsqueeze(-1), B.unsqueeze(2), out=hs)
    hs[0].addcmul_(dA[0], h0)
    for t in range(1, hs.shape[0]):
        hs[t].addcmul_(dA[t], hs[t - 1])


def _time_major(*tensors):
    """(b, c, l) -> contiguous (l, b, c): a chunk of time steps is then one contiguous block."""
    return [t.permute(2, 0, 1).contiguous() for t in tensors]


class ChunkedScan(torch.autograd.Function):
    """The selective scan in chunks of `chunk` time steps, with a hand-written backward. Shapes: u, delta, z
    (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d). Computes in fp32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, chunk=CHUNK):
        dtype = torch.promote_types(u.dtype, torch.float32)
        u, delta, A, B, C, D, z = (t.to(dtype) for t in (u, delta, A, B, C, D, z))
        pre = delta + delta_bias.to(dtype)[:, None] if delta_bias is not None else delta
        dt = F.softplus(pre)
        (b, d, l), n = u.shape, A.shape[1]
        dt_t, dtu_t, B_t, C_t = _time_major(dt, dt * u, B, C)
        k = min(chunk, l)
        dA, hs = u.new_empty(k, b, d, n), u.new_empty(k, b, d, n)
        y_t, starts, h = u.new_empty(l, b, d), [], u.new_zeros(b, d, n)
        for s in range(0, l, k):
            e = min(s + k, l)
            starts.append(h)
            _chunk_states(dA[:e - s], hs[:e - s], dt_t[s:e], dtu_t[s:e], B_t[s:e], A, h)
            torch.bmm(hs[:e - s].view(-1, d, n), C_t[s:e].view(-1, n, 1), out=y_t[s:e].view(-1, d, 1))
            h = hs[e - s - 1].clone()
        y = y_t.permute(1, 2, 0) + u * D[:, None]
        ctx.save_for_backward(u, pre, A, B_t, C_t, D, z, torch.stack(starts), y)
        ctx.has_bias, ctx.chunk = delta_bias is not None, k
        return y * F.silu(z)

    @staticmethod
    def backward(ctx, g):
        u, pre, A, B_t, C_t, D, z, starts, y = ctx.saved_tensors
        (b, d, l), n, k = u.shape, A.shape[1], ctx.chunk
        dt = F.softplus(pre)
        sig = torch.sigmoid(z)
        gy = g * z * sig  # dL/dy
        dt_t, dtu_t, gy_t = _time_major(dt, dt * u, gy)
        dA, hs, lam = (u.new_empty(k, b, d, n) for _ in range(3))
        dC_t, dB_t, lamB, ddtA = u.new_empty(l, b, n), u.new_empty(l, b, n), u.new_empty(l, b, d), u.new_empty(l, b, d)
        dA_param, carry = torch.zeros_like(A), u.new_zeros(b, d, n)  # carry = dA_{e} lam_{e} from the next chunk
        for c in range(len(starts) - 1, -1, -1):
            s, e = c * k, min(c * k + k, l)
            dAc, hc, lc = dA[:e - s], hs[:e - s], lam[:e - s]
            _chunk_states(dAc, hc, dt_t[s:e], dtu_t[s:e], B_t[s:e], A, starts[c])
            # reverse scan: lam_t = dL/dh_t = gy_t C_t + dA_{t+1} lam_{t+1}
            torch.mul(gy_t[s:e].unsqueeze(-1), C_t[s:e].unsqueeze(2), out=lc)
            lc[-1].add_(carry)
            for t in range(e - s - 2, -1, -1):
                lc[t].addcmul_(dAc[t + 1], lc[t + 1])
            carry = dAc[0] * lc[0]
            torch.bmm(gy_t[s:e].view(-1, 1, d), hc.view(-1, d, n), out=dC_t[s:e].view(-1, 1, n))
            torch.bmm(lc.view(-1, d, n), B_t[s:e].view(-1, n, 1), out=lamB[s:e].view(-1, d, 1))
            torch.bmm(dtu_t[s:e].view(-1, 1, d), lc.view(-1, d, n), out=dB_t[s:e].view(-1, 1, n))
            P = dAc.mul_(lc)  # P_t = dL/d(dt_t A) = lam_t dA_t h_{t-1}
            P[1:].mul_(hc[:-1])
            P[0].mul_(starts[c])
            dA_param += torch.mul(P, dt_t[s:e].unsqueeze(-1), out=hc).sum((0, 1))
            torch.sum(torch.mul(P, A, out=hc), -1, out=ddtA[s:e])
        lamB = lamB.permute(1, 2, 0)  # sum_n lam B = dL/d(dt u)
        dpre = (ddtA.permute(1, 2, 0) + lamB * u) * torch.sigmoid(pre)
        du = gy * D[:, None] + lamB * dt
        dz = g * y * sig * (1 + z * (1 - sig))
        dbias = dpre.sum((0, 2)) if ctx.has_bias else None
        return (du, dpre, dA_param, dB_t.permute(1, 2, 0), dC_t.permute(1, 2, 0), (gy * u).sum((0, 2)), dz, dbias,
                None)


def selective_scan(u, delta, A, B, C, D, z, delta_bias=None):
    """out (b, d, l) = selective scan with softplus on delta (+ delta_bias), gated by silu(z); B, C (b, n, l)."""
    name, _ = backend(u.device.type)
    if name == "mamba":
        if A.shape[1] > MAMBA_MAX_STATE:
            raise ScanBackendError(f"scan backend mamba cannot run a state of {A.shape[1]}: mamba-ssm's selective "
                                   f"scan takes at most {MAMBA_MAX_STATE}; choose triton or torch")
        return cuda_kernels()[0][0](u, delta, A, B.unsqueeze(1).contiguous(), C.unsqueeze(1).contiguous(), D.float(),
                                    z, delta_bias=delta_bias, delta_softplus=True)
    if name == "triton":
        return triton_scan()[0].selective_scan(u, delta, A, B, C, D, z, delta_bias)
    with torch.autocast(u.device.type, enabled=False):  # fp32 matmuls inside, whatever the caller's autocast
        return ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias)


def causal_conv1d(x, weight, bias):
    """SiLU(causal depthwise conv) of x (b, d, l) with weight (d, 1, k): causal-conv1d's kernel under the
    mamba backend, else a grouped F.conv1d padded on both sides (the right padding is computed and dropped)."""
    if backend(x.device.type)[0] == "mamba":
        return cuda_kernels()[0][1](x, weight.squeeze(1), bias, activation="silu")
    k = weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]])
