"""The selective scan as Triton kernels, forward and backward: Mamba on CUDA without compiled extensions.

Same semantics and shapes as `ssm.ChunkedScan` (fp32 compute; softplus on delta + delta_bias; D skip;
SiLU(z) gate). Inputs are copied channel-last, (b, l, d), so each time step reads contiguous channels. One
program per (batch row, block of BLOCK_D channels) walks the sequence with its state (BLOCK_D, n) in
registers. The backward first reruns the forward writing every state to a scratch tensor (b, l, d, n) fp32
(freed after the call; at Vim-S batch 64, 620 MB for one direction of one layer), then walks the sequence
backwards. Sums across channels (dB, dC) and batch rows (dA) are written as per-program partials and
summed by torch: no atomics, so the gradients are the same bits run to run.
Any state size n runs: the state block is (BLOCK_D, next power of two >= n), the extra columns masked; a block
past Triton's largest tensor raises ScanBackendError (`check_state`) before any launch.
On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1): the tests use it.
"""
import torch
import triton
import triton.language as tl
from triton.language.core import TRITON_MAX_TENSOR_NUMEL

from .ssm import ScanBackendError

BLOCK_D = 32


# Only triton.language builtins and our own jit functions are used (not tl.zeros / tl.sum / tl.sigmoid, which
# are jit functions of Triton's own: they run under the interpreter only when it was on when Triton was imported).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis):
    return tl.reduce(x, axis, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    """log(1 + e^x) as torch computes it (x above 20 passes through); e^x below -15 (log1p's first term)."""
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _forward(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, y_ptr, states_ptr, l, d, n,
             HAS_BIAS: tl.constexpr, STORE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    st = tl.arange(0, BLOCK_N)
    cm, sm = ch < d, st < n
    m2 = cm[:, None] & sm[None, :]
    A = tl.load(A_ptr + ch[:, None] * n + st[None, :], mask=m2, other=0.0)
    Dc = tl.load(D_ptr + ch, mask=cm, other=0.0)
    bias = tl.load(bias_ptr + ch, mask=cm, other=0.0) if HAS_BIAS else tl.full((BLOCK_D,), 0.0, tl.float32)
    row, brow = b * l * d + ch, b * l * n + st  # (b, 0, ch) in (b, l, d); (b, 0, st) in (b, l, n)
    h = tl.full((BLOCK_D, BLOCK_N), 0.0, tl.float32)
    for t in range(l):
        u = tl.load(u_ptr + row + t * d, mask=cm, other=0.0)
        dt = _softplus(tl.load(delta_ptr + row + t * d, mask=cm, other=0.0) + bias)
        Bt = tl.load(B_ptr + brow + t * n, mask=sm, other=0.0)
        Ct = tl.load(C_ptr + brow + t * n, mask=sm, other=0.0)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        if STORE_STATES:
            tl.store(states_ptr + (row + t * d)[:, None] * n + st[None, :], h, mask=m2)
        y = _sum(h * Ct[None, :], axis=1) + Dc * u
        z = tl.load(z_ptr + row + t * d, mask=cm, other=0.0)
        tl.store(y_ptr + row + t * d, y, mask=cm)
        tl.store(out_ptr + row + t * d, y * z * _sigmoid(z), mask=cm)


@triton.jit
def _backward(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, states_ptr, g_ptr,
              du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, l, d, n,
              HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b, blk = tl.program_id(0), tl.program_id(1)
    ch = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    st = tl.arange(0, BLOCK_N)
    cm, sm = ch < d, st < n
    m2 = cm[:, None] & sm[None, :]
    A = tl.load(A_ptr + ch[:, None] * n + st[None, :], mask=m2, other=0.0)
    Dc = tl.load(D_ptr + ch, mask=cm, other=0.0)
    bias = tl.load(bias_ptr + ch, mask=cm, other=0.0) if HAS_BIAS else tl.full((BLOCK_D,), 0.0, tl.float32)
    row, brow = b * l * d + ch, b * l * n + st
    prow = (b * tl.num_programs(1) + blk) * l * n + st  # this program's partial sums, (b, blocks, l, n)
    carry = tl.full((BLOCK_D, BLOCK_N), 0.0, tl.float32)  # dA_{t+1} lam_{t+1}
    dA_sum = tl.full((BLOCK_D, BLOCK_N), 0.0, tl.float32)
    for i in range(l):
        t = l - 1 - i
        u = tl.load(u_ptr + row + t * d, mask=cm, other=0.0)
        pre = tl.load(delta_ptr + row + t * d, mask=cm, other=0.0) + bias
        dt = _softplus(pre)
        z = tl.load(z_ptr + row + t * d, mask=cm, other=0.0)
        g = tl.load(g_ptr + row + t * d, mask=cm, other=0.0)
        y = tl.load(y_ptr + row + t * d, mask=cm, other=0.0)
        sig = _sigmoid(z)
        gy = g * z * sig  # dL/dy
        tl.store(dz_ptr + row + t * d, g * y * sig * (1 + z * (1 - sig)), mask=cm)
        Bt = tl.load(B_ptr + brow + t * n, mask=sm, other=0.0)
        Ct = tl.load(C_ptr + brow + t * n, mask=sm, other=0.0)
        h = tl.load(states_ptr + (row + t * d)[:, None] * n + st[None, :], mask=m2, other=0.0)
        h_prev = tl.load(states_ptr + (row + (t - 1) * d)[:, None] * n + st[None, :], mask=m2 & (t > 0), other=0.0)
        lam = gy[:, None] * Ct[None, :] + carry  # dL/dh_t
        carry = tl.exp(dt[:, None] * A) * lam
        P = carry * h_prev  # dL/d(dt_t A) = lam_t exp(dt_t A) h_{t-1}
        dA_sum += P * dt[:, None]
        lamB = _sum(lam * Bt[None, :], axis=1)  # dL/d(dt u)
        tl.store(ddelta_ptr + row + t * d, (_sum(P * A, axis=1) + lamB * u) * _sigmoid(pre), mask=cm)
        tl.store(du_ptr + row + t * d, gy * Dc + lamB * dt, mask=cm)
        tl.store(dC_ptr + prow + t * n, _sum(gy[:, None] * h, axis=0), mask=sm)
        tl.store(dB_ptr + prow + t * n, _sum(lam * (dt * u)[:, None], axis=0), mask=sm)
    tl.store(dA_ptr + (b * d + ch)[:, None] * n + st[None, :], dA_sum, mask=m2)


def check_state(n: int, block_d: int = BLOCK_D) -> None:
    """ScanBackendError when a state of n does not fit one Triton block (block_d x next_power_of_2(n))."""
    if block_d * triton.next_power_of_2(n) > TRITON_MAX_TENSOR_NUMEL:
        raise ScanBackendError(f"scan backend triton cannot run a state of {n}: its ({block_d}, "
                               f"{triton.next_power_of_2(n)}) state block exceeds Triton's {TRITON_MAX_TENSOR_NUMEL} "
                               "elements; choose torch")


def _channel_last(*tensors):
    """(b, c, l) -> fp32 contiguous (b, l, c)."""
    return [t.float().transpose(1, 2).contiguous() for t in tensors]


class TritonScan(torch.autograd.Function):
    """Shapes: u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, block_d=BLOCK_D):
        (b, d, l), n = u.shape, A.shape[1]
        check_state(n, block_d)
        u, delta, B, C, z = _channel_last(u, delta, B, C, z)
        A, D = A.float().contiguous(), D.float().contiguous()
        bias = delta_bias.float().contiguous() if delta_bias is not None else D  # D: a placeholder pointer
        out, y = torch.empty_like(u), torch.empty_like(u)
        grid = (b, triton.cdiv(d, block_d))
        meta = dict(HAS_BIAS=delta_bias is not None, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n))
        _forward[grid](u, delta, A, B, C, D, z, bias, out, y, out, l, d, n, STORE_STATES=False, **meta)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, y)
        ctx.grid, ctx.meta = grid, meta
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, g):
        u, delta, A, B, C, D, z, bias, y = ctx.saved_tensors
        (b, l, d), n, grid, meta = u.shape, A.shape[1], ctx.grid, ctx.meta
        states = u.new_empty(b, l, d, n)
        _forward[grid](u, delta, A, B, C, D, z, bias, torch.empty_like(u), y, states, l, d, n, STORE_STATES=True,
                       **meta)
        (g,) = _channel_last(g)
        du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u)
        dA = u.new_empty(b, d, n)
        dB, dC = u.new_empty(b, grid[1], l, n), u.new_empty(b, grid[1], l, n)
        _backward[grid](u, delta, A, B, C, D, z, bias, y, states, g, du, ddelta, dz, dA, dB, dC, l, d, n, **meta)
        dD = (g * z * torch.sigmoid(z) * u).sum((0, 1))
        dbias = ddelta.sum((0, 1)) if meta["HAS_BIAS"] else None
        return (du.transpose(1, 2), ddelta.transpose(1, 2), dA.sum(0), dB.sum(1).transpose(1, 2),
                dC.sum(1).transpose(1, 2), dD, dz.transpose(1, 2), dbias, None)


def selective_scan(u, delta, A, B, C, D, z, delta_bias=None):
    """out (b, d, l), fp32: the selective scan with softplus on delta (+ delta_bias), gated by silu(z)."""
    return TritonScan.apply(u, delta, A, B, C, D, z, delta_bias)
