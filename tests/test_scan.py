"""The selective scan: every backend against the per-token definition (outputs, gradients, large dt),
gradcheck, and the backend choice (devices and imports mocked)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from backbones import ssm
from backbones.ssm import ChunkedScan, ScanBackendError, choose, selective_scan


def naive_scan(u, delta, A, B, C, D, z, bias):
    """Token by token, channel by channel: the selective scan as written in the Mamba paper."""
    b, d, l = u.shape
    out = torch.zeros(b, d, l, dtype=u.dtype)
    for i in range(b):
        for c in range(d):
            h = torch.zeros(A.shape[1], dtype=u.dtype)
            for t in range(l):
                dt = F.softplus(delta[i, c, t] + (bias[c] if bias is not None else 0))
                h = torch.exp(dt * A[c]) * h + dt * B[i, :, t] * u[i, c, t]
                y = (h * C[i, :, t]).sum() + D[c] * u[i, c, t]
                out[i, c, t] = y * z[i, c, t] * torch.sigmoid(z[i, c, t])
    return out


def scan_inputs(b=2, d=5, l=7, n=3, seed=0):
    """Random inputs with some large dt (softplus(delta) up to ~60: decays underflow to 0)."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(b, d, l, generator=g) * 3
    delta[0, -1, l // 2], delta[-1, 0, -1] = 60.0, 45.0
    return [torch.randn(b, d, l, generator=g), delta, -torch.rand(d, n, generator=g) - 0.1,
            torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g), torch.randn(d, generator=g),
            torch.randn(b, d, l, generator=g), torch.randn(d, generator=g)]


SCANS = {
    "torch, chunks of 3 (the last ragged)": lambda *a: ChunkedScan.apply(*a, 3),
    "torch, one chunk": lambda *a: ChunkedScan.apply(*a, 100),
    "torch, chunks of 1": lambda *a: ChunkedScan.apply(*a, 1),
    "triton (interpreter)": "triton",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SCANS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_scan_equals_naive_loop_outputs_and_gradients(name, with_bias, scan_backend):
    scan = SCANS[name]
    if scan == "triton":
        scan_backend("triton")
        scan = selective_scan
    leaves = scan_inputs()
    if not with_bias:
        leaves[-1] = None
    ours = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    ref = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    out, want = scan(*ours), naive_scan(*ref)
    assert out.shape == want.shape and torch.isfinite(out).all()
    assert_close(out, want, 1e-5)
    g = torch.randn_like(want)
    (out * g).sum().backward()
    (want * g).sum().backward()
    for a, r in zip(ours, ref):
        if a is not None:
            assert torch.isfinite(a.grad).all()
            assert_grads_close(a.grad, r.grad)


def assert_grads_close(got, want):
    """Relative to the gradient's own size (an absolute 1e-4 would pass gradients smaller than that), down to
    fp32's smallest normal number (below it, denormals carry fewer bits: e.g. dA at dt ~ 80 is ~1e-41)."""
    assert want.abs().max() > 0
    atol = max(1e-5 * want.abs().max().item(), torch.finfo(want.dtype).tiny)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)


def assert_equals_float64_loop(scan, leaves):
    """scan(*leaves) in fp32 against the per-step loop in float64, outputs and every input's gradient;
    tolerances relative to each tensor's magnitude."""
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.double().requires_grad_() for t in leaves]
    out = scan(*ours)
    want = naive_scan(*ref)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (out * g.float()).sum().backward()
    (want * g).sum().backward()
    for name, a, r in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), ours, ref):
        assert r.grad.abs().max() > 0, name
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-5 * r.grad.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("d,block_d", [(70, None), (11, 4)])
def test_triton_scan_spanning_several_channel_blocks_equals_a_float64_loop(d, block_d, scan_backend):
    """The kernels split channels into blocks of BLOCK_D (one program per batch row and block); dB and dC are
    per-program partials summed over blocks, dA over batch rows, so a partial sum that is right for one
    block only passes at d <= BLOCK_D. Here: 3 blocks, the last one ragged (70 = 32 + 32 + 6 at the
    shipped BLOCK_D; 11 = 4 + 4 + 3), 2 batch rows, n = 5 states in a block of 8 (masked), vs the
    per-step loop in float64."""
    scan_backend("triton")
    from backbones import ssm_triton
    block_d = block_d or ssm_triton.BLOCK_D
    assert -(-d // block_d) == 3 and d % block_d
    assert_equals_float64_loop(lambda *a: ssm_triton.TritonScan.apply(*a, block_d),
                               scan_inputs(b=2, d=d, l=6, n=5, seed=3))


@pytest.mark.slow
@pytest.mark.parametrize("name", SCANS)
def test_every_backend_runs_a_state_of_22_equal_to_a_float64_loop(name, scan_backend):
    """addscan's default on Vim: 16 + 6 = 22 states, not a power of two (Triton's state block of 32 masks 10
    columns; the torch scan sizes its chunks by A's columns)."""
    scan = SCANS[name]
    if scan == "triton":
        scan_backend("triton")
        scan = selective_scan
    assert_equals_float64_loop(scan, scan_inputs(b=2, d=4, l=6, n=22, seed=5))


def test_mamba_kernels_get_the_wider_state_in_their_layout_and_more_than_256_is_refused(monkeypatch):
    """The mamba backend's calling convention, with the kernel's own checks mocked on the CPU (mamba-ssm
    csrc/selective_scan/selective_scan.cpp: B and C input-dependent as (b, groups, n, l) with unit stride
    along l, D fp32, dstate <= 256): a state of 22 reaches the kernel as it is; 257 is refused by the backend
    in one line, before the kernel, instead of the kernel's RuntimeError or another backend."""
    calls = []

    def selective_scan_fn(u, delta, A, B, C, D, z, delta_bias=None, delta_softplus=False):
        (b, _, l), n = u.shape, A.shape[1]
        assert B.shape == C.shape == (b, 1, n, l) and B.stride(-1) == C.stride(-1) == 1
        assert D.dtype == torch.float32 and delta_softplus
        if n > 256:
            raise RuntimeError("selective_scan only supports state dimension <= 256")
        calls.append(n)
        return ChunkedScan.apply(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias)
    monkeypatch.setattr(ssm, "cuda_kernels", lambda: ((selective_scan_fn, None), ""))
    monkeypatch.setattr(ssm, "backend", lambda device_type: ("mamba", "forced"))
    leaves = scan_inputs(n=22)
    assert torch.equal(selective_scan(*leaves), ChunkedScan.apply(*leaves)) and calls == [22]
    with pytest.raises(ScanBackendError, match="^scan backend mamba cannot run a state of 257: mamba-ssm's "
                                               "selective scan takes at most 256; choose triton or torch$"):
        selective_scan(*scan_inputs(b=1, d=2, l=3, n=257))
    assert calls == [22]


def test_triton_refuses_a_state_block_past_tritons_largest_tensor(scan_backend):
    scan_backend("triton")
    from backbones import ssm_triton
    n = ssm_triton.TRITON_MAX_TENSOR_NUMEL // ssm_triton.BLOCK_D + 1  # 32,769 states: a (32, 65,536) block
    with pytest.raises(ScanBackendError, match="^scan backend triton cannot run a state of 32769: its "
                                               r"\(32, 65536\) state block exceeds Triton's 1048576 elements"):
        selective_scan(*scan_inputs(b=1, d=1, l=1, n=n))
    ssm_triton.check_state(n - 1)  # the largest that fits


@pytest.mark.slow
@pytest.mark.parametrize("dt", [80.0, 120.0])
@pytest.mark.parametrize("name", SCANS)
def test_scan_is_stable_and_right_when_dt_is_large(name, dt, scan_backend):
    """At dt ~ 80 the decays exp(dt A) are fp32 denormals; at dt ~ 120 every one underflows to 0, so A's
    gradient is exactly 0 in the reference, and ours must be 0 too (not a value the check skips)."""
    scan = SCANS[name]
    if scan == "triton":
        scan_backend("triton")
        scan = selective_scan
    torch.manual_seed(2)
    leaves = [torch.randn(1, 2, 50), torch.full((1, 2, 50), dt) + torch.randn(1, 2, 50), -torch.rand(2, 4) - 1,
              torch.randn(1, 4, 50), torch.randn(1, 4, 50), torch.ones(2), torch.randn(1, 2, 50), torch.zeros(2)]
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    out, want = scan(*ours), naive_scan(*ref)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4 * dt / 80)  # values reach ~dt * |B u C|
    out.sum().backward()
    want.sum().backward()
    if dt == 120.0:
        assert ref[2].grad.abs().max() == 0  # the case this parameter is for: A's gradient is exactly 0
    for a, r in zip(ours, ref):
        assert torch.isfinite(a.grad).all()
        if r.grad.abs().max() > 0:
            assert_grads_close(a.grad, r.grad)
        else:  # a zero gradient is checked too: within fp32's smallest normal number of 0
            assert a.grad.abs().max() <= torch.finfo(torch.float32).tiny, a.grad.abs().max()


def test_chunked_scan_gradcheck_float64():
    args = [t.double().requires_grad_() for t in scan_inputs(b=1, d=2, l=5, n=3, seed=1)]
    args[1] = (args[1].detach() / 3).requires_grad_()  # moderate dt: finite differences need smooth inputs
    assert torch.autograd.gradcheck(lambda *a: ChunkedScan.apply(*a, 2), args)


def test_torch_backend_is_the_default_on_the_cpu(scan_backend):
    scan_backend("auto")
    assert choose("cpu", "auto") == ("torch", "cpu tensors")
    leaves = scan_inputs()
    assert torch.equal(selective_scan(*leaves), ChunkedScan.apply(*leaves))


def mock_imports(monkeypatch, mamba: bool, triton: bool):
    monkeypatch.setattr(ssm, "cuda_kernels", lambda: (("scan", "conv"), "") if mamba else
                        (None, "ModuleNotFoundError: No module named 'mamba_ssm'"))
    monkeypatch.setattr(ssm, "triton_scan", lambda: (object(), "") if triton else
                        (None, "ModuleNotFoundError: No module named 'triton'"))


@pytest.mark.parametrize("mamba,triton,expected", [
    (True, True, "mamba"), (False, True, "triton"), (False, False, "torch")])
def test_auto_on_cuda_prefers_mamba_then_triton_then_torch(monkeypatch, mamba, triton, expected):
    mock_imports(monkeypatch, mamba, triton)
    name, why = choose("cuda", "auto")
    assert name == expected
    if not mamba:
        assert "No module named 'mamba_ssm'" in why
    assert choose("cpu", "auto")[0] == "torch"


@pytest.mark.parametrize("requested,device,mamba,triton,message", [
    ("mamba", "cuda", False, True, "scan backend mamba cannot run: the kernels do not import"),
    ("mamba", "cpu", True, True, "scan backend mamba cannot run: tensors on cpu, not CUDA"),
    ("triton", "cuda", True, False, "scan backend triton cannot run: ModuleNotFoundError"),
    ("triton", "cpu", False, True, "scan backend triton cannot run: tensors on cpu, not CUDA"),
    ("cuda-graphs", "cuda", True, True, "unknown scan backend 'cuda-graphs'"),
])
def test_a_forced_backend_that_cannot_run_says_why_in_one_line(monkeypatch, requested, device, mamba, triton,
                                                               message):
    mock_imports(monkeypatch, mamba, triton)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ScanBackendError, match=message) as e:
        choose(device, requested)
    assert "\n" not in str(e.value)


def test_forced_backends_run_when_they_can(monkeypatch):
    mock_imports(monkeypatch, True, True)
    assert choose("cuda", "triton") == ("triton", "forced")
    assert choose("cuda", "torch") == ("torch", "forced")
    assert choose("cuda", "mamba") == ("mamba", "forced")


def test_the_backend_is_said_once_per_device_type(scan_backend, capsys):
    scan_backend("torch")
    leaves = scan_inputs()
    selective_scan(*leaves)
    selective_scan(*leaves)
    assert capsys.readouterr().err.count("selective scan on cpu: torch (forced)") == 1
    assert ssm.backend("cpu") == ("torch", "forced")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [16, 22])
@pytest.mark.parametrize("name", ["triton", "mamba", "torch"])
def test_cuda_backends_match_the_cpu_scan_and_conv(name, n, monkeypatch):
    """fp32 and bf16 inputs, outputs and gradients, B and C as the mixer passes them (channel-last views of
    x_proj's output), and the conv; Vim's 16 states and addscan's 22; tolerances of upstream's kernel tests
    (fp32) and of bf16 inputs."""
    try:
        ssm.choose("cuda", name)
    except ScanBackendError as e:
        pytest.skip(str(e))
    monkeypatch.setitem(ssm._requested, "name", name)  # compiled kernels: not the `scan_backend` fixture's interpreter
    monkeypatch.setattr(ssm, "backend", functools.cache(ssm.backend.__wrapped__))  # a choice for this test only
    b, d, l = 2, 64, 197
    for dtype, rtol, atol in ((torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)):
        leaves = scan_inputs(b, d, l, n)
        leaves[1] = leaves[1] / 3 - 2
        leaves[3], leaves[4] = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in leaves[3:5])  # (b, l, n)
        cpu = [t.clone().requires_grad_() for t in leaves]
        gpu = [(t.to(dtype) if i in (0, 1, 3, 4, 6) else t).cuda().requires_grad_() for i, t in enumerate(leaves)]
        want = ChunkedScan.apply(*[t.to(dtype).float() if i in (0, 1, 3, 4, 6) else t for i, t in enumerate(cpu)])
        out = selective_scan(*gpu)
        g = torch.randn_like(want)
        want.backward(g)
        out.float().backward(g.cuda())
        assert torch.allclose(out.float().cpu(), want.detach(), rtol=rtol, atol=atol)
        for a, r in zip(gpu, cpu):
            assert torch.allclose(a.grad.float().cpu(), r.grad, rtol=rtol * 10, atol=atol * 10)
    x, w, bias = torch.randn(b, d, l), torch.randn(d, 1, 4), torch.randn(d)
    want = F.silu(F.conv1d(x, w, bias, padding=3, groups=d)[..., :l])
    got = ssm.causal_conv1d(x.cuda(), w.cuda(), bias.cuda()).cpu()
    assert torch.allclose(got, want, rtol=3e-4, atol=1e-3)
