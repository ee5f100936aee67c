"""Helpers shared by the tests (fixtures live in conftest.py): the tiny models and recipe, and the
tolerance rule."""
import torch

from vtab_lily import build_model

TINY = dict(img_size=32, patch_size=8)  # vit-tiny at 32 px: 4 layers, width 64, 16 patches + cls


def tiny(method: str, seed: int = 0, num_classes: int = 5, **options):
    """A tiny ViT with `method` attached; the backbone's weights depend only on `seed`."""
    torch.manual_seed(seed)
    return build_model("vit-tiny", method, num_classes, pretrained=False, backbone_options=TINY, **options)


def randomize_trainable(model, seed: int = 1, std: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


VIM_TINY = dict(img_size=32)  # vim-tiny-test at 32 px: 2 layers of width 32 (d_inner 64), 4 patches + the class token

# The recipe of the runner tests: vit-tiny at 32 px on digits, a few small epochs; a file states what it changes
TINY_RECIPE = {"image_size": 32, "batch_size": 50, "epochs": 2, "eval_every": 1, "warmup_epochs": 1, "lr": 3e-3}


def set_args(recipe: dict) -> list[str]:
    """`--set key=value` for each field of `recipe`, as a command line gives it."""
    return [arg for k, v in recipe.items() for arg in ("--set", f"{k}={v}")]


def assert_close(got, want, rel: float = 1e-5) -> None:
    """max |got - want| <= rel * max |want|: the tolerance scales with the values compared, so an fp32
    comparison holds on any CPU's kernels; parity tests with a different order of operations compute both
    sides in float64 (`rel` 1e-9 there)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x max |want| {scale:.3g}"
