"""Vision Mamba on the CPU, ratios measured in one run:
1. forward+backward of one Vim-S mixer (batch 2, L = 197), and of one scan direction alone: the torch
   backend's chunked scan (`ssm.ChunkedScan`, hand-written backward) vs autograd through a sequential loop,
   two loops: the algorithm of mamba-ssm's `selective_scan_ref`, and a leaner loop vectorised per step (the
   honest baseline; target: the mixer >= 3x it);
2. memory of the per-token Lily in_proj branch (batch 8, L = 197, r = 8, ne = 5) vs the official
   computation that materialises a per-token HP matrix [B, L, r, 1536] (target <= 0.25x): the bytes autograd
   saves for the backward (measured with saved_tensors_hooks) and the largest saved tensor."""
import argparse

import torch
import torch.nn.functional as F
from common import interleaved_medians

import backbones.vim as vim
from backbones import ssm
from backbones.vim import Mixer


def loop_scan(u, delta, A, B, C, D, z, delta_bias=None):
    """The selective scan as a plain loop, differentiated by autograd (the baseline)."""
    dt = F.softplus(delta + delta_bias[:, None] if delta_bias is not None else delta)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + u * D[:, None]) * F.silu(z)


def reference_loop_scan(u, delta, A, B, C, D, z, delta_bias=None):
    """The algorithm of mamba-ssm's pure-PyTorch reference (`selective_scan_ref`), differentiated by autograd:
    the decays and inputs precomputed as (b, d, l, n), then one step per token on their slices."""
    dt = F.softplus(delta + delta_bias[:, None] if delta_bias is not None else delta)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", dt, A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", dt, B, u)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return (torch.stack(ys, -1) + u * D[:, None]) * F.silu(z)


def mixer_step(scan):
    """fwd+bwd of one Vim-S mixer (batch 2, L = 197) with `scan` as its selective scan."""
    torch.manual_seed(0)
    mixer, h = Mixer(384), torch.randn(2, 197, 384, requires_grad=True)

    def step():
        original, vim.selective_scan = vim.selective_scan, scan
        try:
            mixer(h).sum().backward()
        finally:
            vim.selective_scan = original
    return step


def scan_step(scan, n: int = 16, b: int = 2):
    """fwd+bwd of one Vim-S scan direction alone (d_inner 768, n states (Vim: 16), batch b, L = 197)."""
    torch.manual_seed(0)
    d, l = 768, 197
    args = [torch.randn(b, d, l), torch.randn(b, d, l) - 2, -torch.rand(d, n) - 0.1, torch.randn(b, n, l),
            torch.randn(b, n, l), torch.randn(d), torch.randn(b, d, l), torch.randn(d)]
    args = [a.requires_grad_() for a in args]
    return lambda: scan(*args).sum().backward()


def branch_memory(kind: str) -> tuple[int, int]:
    """Bytes saved for the backward and the largest tensor made, for one forward of the in_proj branch."""
    torch.manual_seed(0)
    b, l, d, r, ne, d_out = 8, 197, 384, 8, 5, 1536
    x = torch.randn(b, l, d)
    lp = torch.randn(r, d, requires_grad=True)
    router = torch.randn(ne, r, requires_grad=True)
    hps = torch.randn(ne, r, d_out, requires_grad=True)
    saved, largest = {}, [0]

    def pack(t):
        saved[t.data_ptr()] = t.numel() * t.element_size()
        largest[0] = max(largest[0], t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = x @ lp.T
        probs = torch.softmax(h @ router.T, -1)
        if kind == "official":  # the official Vim code: a per-token HP matrix [B, L, r, d_out]
            out = torch.einsum("bld,blde->ble", h, torch.einsum("ble,eio->blio", probs, hps))
        else:
            out = (probs.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2) @ hps.flatten(0, 1)
    out.square().sum().backward()
    return sum(saved.values()), largest[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for label, make in (("Vim-S mixer fwd+bwd, batch 2, L=197", mixer_step),
                        ("one scan direction alone (d_inner 768)", scan_step)):
        scans = (ssm.selective_scan, reference_loop_scan, loop_scan)
        ours, ref, loop = interleaved_medians([make(scan) for scan in scans], args.repeats)
        print(f"{label}, CPU: chunked scan {ours * 1e3:.0f} ms; autograd through the reference loop "
              f"{ref * 1e3:.0f} ms ({ref / ours:.1f}x); autograd through a loop vectorised per step "
              f"{loop * 1e3:.0f} ms ({loop / ours:.1f}x)")
    (ours_saved, ours_max), (off_saved, off_max) = branch_memory("ours"), branch_memory("official")
    print(f"per-token Lily in_proj branch, batch 8, L=197, r=8, ne=5: saved for backward {ours_saved / 2**20:.1f} MiB "
          f"(ours) vs {off_saved / 2**20:.1f} MiB (per-token HP matrices) = {ours_saved / off_saved:.3f}x; largest "
          f"tensor {ours_max / 2**20:.1f} vs {off_max / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
