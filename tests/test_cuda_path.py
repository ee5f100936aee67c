"""The CUDA path's runner defects, checked on the CPU with the device mocked or `meta` tensors: resume with
fewer GPUs, sweep workers under a parent mask, CUDA out of memory as a failed run, host syncs per step and
per evaluation, fp32 dt bias and scan under bf16 autocast, the GPU check's projection."""
import sys

import numpy as np
import pytest
import torch
from helpers import tiny

from backbones import ssm
from backbones.vim import Mixer
from vtab_lily import sweep as sweep_cli
from vtab_lily.data import Batches, Split
from vtab_lily.recipes import recipe_for
from vtab_lily.train import Interrupted, evaluate, fit, make_optimizer, make_scheduler, restore_state


def tiny_split(n=40, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 5, n), cache=None)


@pytest.mark.parametrize("saved_gpus", [2, 1])
def test_resume_with_fewer_gpus_than_at_save(tmp_path, monkeypatch, saved_gpus):
    """A state saved on a two-GPU node (one generator state per GPU, as get_rng_state_all wrote) or on one GPU
    resumes on one visible GPU (a one-GPU sweep worker): restore_state, as fit calls it on a CUDA run, puts the
    run's own generator state back on its GPU and asks for no other device."""
    restored = []

    def set_rng_state(state, device="cuda"):  # as torch: a device index that does not exist is an IndexError
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise IndexError(f"no CUDA device {index}")
        restored.append((state, index))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    recipe = recipe_for("vit-tiny", epochs=2, warmup_epochs=0, batch_size=10, eval_every=1, image_size=32)
    model, state = tiny("lora", r=2), tmp_path / "run.state.pt"
    train, test = Batches(tiny_split(), 10, shuffle=True, drop_last=True), Batches(tiny_split(seed=1), 20)
    with pytest.raises(Interrupted):
        fit(model, train, test, recipe, state, interrupt_after=1, progress=False)
    saved = torch.load(state, weights_only=True)  # our state is data: tensors and plain values
    per_gpu = [torch.full((4,), i, dtype=torch.uint8) for i in range(saved_gpus)]
    saved["rng_cuda"] = per_gpu if saved_gpus > 1 else per_gpu[0]
    torch.save(saved, state)
    optimizer = make_optimizer(model, recipe)
    history, start = restore_state(state, model, optimizer, make_scheduler(optimizer, recipe, len(train)),
                                   torch.device("cuda"))
    assert start == 1 and len(history.lrs) == 1 and state.exists()  # resumed, not moved aside as damaged
    assert len(restored) == 1 and torch.equal(restored[0][0], per_gpu[0]) and restored[0][1] == 0


@pytest.mark.parametrize("mask,count,gpus,per_gpu,expected", [
    ("3,5,7", 3, 2, 1, ["3", "5"]),
    ("3,5,7", 3, 2, 2, ["3", "3", "5", "5"]),
    (None, 2, 2, 1, ["0", "1"]),
    (None, 0, 1, 2, [None, None]),  # no GPU: K processes on the CPU
])
def test_sweep_workers_take_the_gpus_this_process_sees(monkeypatch, mask, count, gpus, per_gpu, expected):
    if mask is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert sweep_cli.worker_gpus(gpus, per_gpu) == expected


def test_more_gpus_than_visible_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code = sweep_cli.main(["--backbones", "vit-tiny", "--methods", "lora", "--tasks", "digits", "--gpus", "3",
                           "--runs", str(tmp_path / "runs"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --gpus 3: this process sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=3,5); lower --gpus\n"
    assert not (tmp_path / "runs").exists()


def test_cuda_out_of_memory_is_a_failed_run_not_a_dead_worker(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    monkeypatch.setattr(sweep_cli, "execute", out_of_memory)
    status = sweep_cli.run_job(None, "runs", "data", None, False)
    assert status == ("failed: CUDA out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower the "
                      "batch size or --runs-per-gpu")


def count_transfers(monkeypatch):
    """Copies from the CPU to another device (here `meta`), counted."""
    copies, to = [], torch.Tensor.to

    def counted(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            copies.append(tuple(self.shape))
        return out
    monkeypatch.setattr(torch.Tensor, "to", counted)
    return copies


@pytest.mark.parametrize("resident", [True, False])
def test_batches_copy_nothing_per_step_but_the_streamed_images(monkeypatch, resident):
    batches = Batches(tiny_split(), 10, shuffle=True, drop_last=True, device="meta", resident=resident)
    copies = count_transfers(monkeypatch)
    got = list(batches)
    assert len(got) == 4 and all(x.shape == (10, 3, 32, 32) and y.shape == (10,) for x, y in got)
    assert all(x.device.type == "meta" and y.device.type == "meta" for x, y in got)
    images = [] if resident else [(10, 32, 32, 3)] * 4  # streamed: only the images, one copy per batch
    assert copies == [(40,)] + images  # the epoch's order, once


def test_one_host_sync_per_training_step_and_per_evaluation(monkeypatch):
    recipe = recipe_for("vit-tiny", epochs=1, warmup_epochs=0, batch_size=10, eval_every=1, image_size=32)
    model = tiny("lora", r=2)
    train, test = Batches(tiny_split(), 10, shuffle=True, drop_last=True), Batches(tiny_split(seed=1), 15)
    syncs = []  # tensor -> Python conversions in our code: each waits for the device

    def counted(name, original):
        def call(self, *args, **kwargs):
            if sys._getframe(1).f_globals["__name__"].startswith("vtab_lily"):  # not AdamW's CPU step counters
                syncs.append(name)
            return original(self, *args, **kwargs)
        return call
    for name in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    evaluate(model, test, recipe)  # 3 batches
    assert syncs == ["cpu"]  # the sums and the predictions together
    syncs.clear()
    test.split = tiny_split(n=5, seed=1)
    test.labels = test.labels[:5]
    fit(model, train, test, recipe, progress=False)  # 4 steps, then a one-batch test
    assert syncs == ["item"] * 4 + ["cpu"]


def test_bf16_autocast_keeps_the_dt_bias_and_the_torch_scan_in_fp32(monkeypatch, scan_backend):
    scan_backend("torch")
    torch.manual_seed(0)
    mixer, h = Mixer(16), torch.randn(2, 7, 16)
    seen = {}

    def capture(u, delta, *rest):
        seen["delta"] = delta
        return ssm.selective_scan(u, delta, *rest)
    monkeypatch.setattr("backbones.vim.selective_scan", capture)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer.scan(mixer.in_proj(h).transpose(1, 2), "")
        args = [t.float() for t in (torch.randn(2, 6, 9), torch.randn(2, 6, 9), -torch.rand(6, 4) - 0.1,
                                    torch.randn(2, 4, 9), torch.randn(2, 4, 9), torch.randn(6), torch.randn(2, 6, 9))]
        under_autocast = ssm.selective_scan(*args, torch.randn(6, generator=torch.Generator().manual_seed(1)))
    assert seen["delta"].dtype == torch.float32  # dt_proj (its bias included) ran in fp32
    want = ssm.selective_scan(*args, torch.randn(6, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(under_autocast, want)


def test_gpu_check_projects_the_real_test_splits_and_the_images_drop_last_trains():
    from vtab_lily.doctor import projected_run_s, test_split_sizes
    sizes = test_split_sizes()
    assert len(sizes) == 19 and sum(sizes.values()) / 19 == 20_416 and max(sizes.values()) == 73_728
    rate = {"batch": 64, "train_ips": 960.0, "eval_ips": 1000.0}
    assert projected_run_s(rate, 20_416) == pytest.approx(100 + 10 * 20.416)
    assert projected_run_s(rate, 73_728) == pytest.approx(100 + 10 * 73.728)
