"""Checks that tell a wrong suite from a right one (issue 18, section 10): no image in two splits of any task
the suite generates, the published constants, each interpolation against PIL's own resize, evaluate's loss
and accuracy against a naive per-image loop, and a run that trains on full batches only (drop_last) and
evaluates every image exactly once, on splits that do not divide by their batch sizes.
(The Triton kernels across several channel blocks: tests/test_scan.py.)"""
import copy
import hashlib
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from backbones.shapes import SIZE
from vtab_lily import run as run_module
from vtab_lily import train as train_module
from vtab_lily.data import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Batches, Split, load_split, read_list, to_float
from vtab_lily.recipes import RECIPES, Recipe
from vtab_lily.records import RunSpec, read_record
from vtab_lily.run import execute
from vtab_lily.tasks import MINI_TASKS, SPLIT_SIZES, TASKS, VTAB_TASKS

SPLITS = ("train800", "val200", "test")


def digest(image: np.ndarray) -> str:
    """An image's identity: its pixels' bytes (and shape), whatever file or format holds them."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).hexdigest()


def listed_digests(folder, split: str, num_classes: int) -> Counter:
    """The digests of the images a prepared split's list names, decoded as the loader reads them."""
    paths, _ = read_list(folder, split, num_classes)
    out = Counter()
    for p in paths:
        with Image.open(p) as im:
            out[digest(np.asarray(im.convert("RGB")))] += 1
    return out


def assert_disjoint(digests: dict) -> None:
    for a, b in combinations(digests, 2):
        shared = digests[a].keys() & digests[b].keys()
        assert not shared, f"{len(shared)} images are in both {a} and {b}"


# --- 2. no image in two splits ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", MINI_TASKS)
def test_generated_task_shares_no_image_between_its_splits(name):
    task = TASKS[name]
    sources = {sl.split: task.offline(sl.split) for split in SPLITS for sl in task.slices[split]}
    digests = {}
    for split in SPLITS:
        (sl,) = task.slices[split]
        source = sources[sl.split]
        digests[split] = Counter(digest(task.image(source[i])) for i in sl.indices(len(source)))
    held_out = 797 if name in ("digits", "mini_svhn") else 1000  # the digits after the first 1,000
    assert {s: sum(c.values()) for s, c in digests.items()} == {"train800": 800, "val200": 200, "test": held_out}
    assert_disjoint(digests)


@pytest.mark.slow
def test_mini_svhn_draws_train_and_test_from_disjoint_digits():
    """Its images differ (fresh backgrounds) even if a glyph is reused, so pin which digits each split draws:
    the labels in order are scikit-learn's targets of digits 0..999 (train) and 1000.. (test)."""
    target = load_digits().target
    train, test = (TASKS["mini_svhn"].offline(s) for s in ("train", "test"))
    assert [e["label"] for e in train] == target[:1000].tolist()
    assert [e["label"] for e in test] == target[1000:].tolist()


@pytest.mark.slow
def test_prepared_lists_share_no_image(data_root):
    """What prepare wrote (digits: all three splits from one source), read back through the lists."""
    folder = data_root / "digits"
    digests = {s: listed_digests(folder, s, 10) for s in SPLITS}
    assert {s: sum(c.values()) for s, c in digests.items()} == {"train800": 800, "val200": 200, "test": 797}
    assert_disjoint(digests)
    assert listed_digests(folder, "train800val200", 10) == digests["train800"] + digests["val200"]


@pytest.mark.parametrize("name", VTAB_TASKS)
def test_vtab_slices_of_one_source_split_do_not_overlap(name):
    """On the full tfds split sizes (what tfds mock data cannot show: it draws example i the same in every
    split); tests/test_data.py checks the images prepare writes under mock data."""
    task = TASKS[name]
    sizes = SPLIT_SIZES[task.builder]
    ranges = {s: (sl.split, sl.indices(sizes[sl.split])) for s in SPLITS for sl in task.slices[s]}
    assert len(ranges["train800"][1]) == 800 and len(ranges["val200"][1]) == 200 and len(ranges["test"][1]) > 0
    for (a, (sa, ra)), (b, (sb, rb)) in combinations(ranges.items(), 2):
        if sa == sb:
            assert max(ra.start, rb.start) >= min(ra.stop, rb.stop), f"{a} {ra} and {b} {rb} of {sa} overlap"


# --- 3. constants against their published values ----------------------------------------------------------------

def test_normalisation_constants_are_the_published_imagenet_ones():
    # torchvision's models documentation (https://pytorch.org/vision/stable/models.html) and every ImageNet
    # recipe: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]; timm/data/constants.py lines 3-4
    # (IMAGENET_DEFAULT_MEAN / _STD); JieShibo/PETL-ViT FacT/vtab.py:81 normalises VTAB-1K with them.
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) == timm.data.IMAGENET_DEFAULT_MEAN
    assert IMAGENET_STD == (0.229, 0.224, 0.225) == timm.data.IMAGENET_DEFAULT_STD
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    want = (x.double() / 255 - mean) / std  # every channel, in float64
    torch.testing.assert_close(to_float(x, normalize=True).double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(to_float(x).double(), x.double() / 255, rtol=1e-7, atol=0)


def test_resize_constants_are_the_official_pipelines():
    # JieShibo/PETL-ViT (the Lily / Binary Adapter / FacT VTAB code) FacT/vtab.py @026e4f1: line 79
    # `transforms.Resize((224, 224), interpolation=3)` (3 = PIL's BICUBIC), line 86 train batch 64 with
    # drop_last=True, line 92 test batch 256; binary_adapter/vtab.py lines 86, 97, 103 the same.
    vit = RECIPES["vit"]
    assert (vit.image_size, vit.interpolation, vit.batch_size, vit.eval_batch_size) == (224, "bicubic", 64, 256)
    assert INTERPOLATIONS["bicubic"] == Image.Resampling.BICUBIC == 3
    for name, pil in INTERPOLATIONS.items():
        assert pil == Image.Resampling[name.upper()], name
    # the mini backbones are pretrained at backbones/shapes.SIZE pixels; their recipes train at that size
    assert SIZE == 32 and RECIPES["vit-mini"].image_size == RECIPES["vim-mini"].image_size == SIZE


# --- 4. each interpolation against PIL ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [5, 32])  # digits are 8 x 8: down- and upsampling
def test_each_interpolation_is_pils_own_resize(data_root, size):
    paths, _ = read_list(data_root / "digits", "val200", 10)
    got = {}
    for name in INTERPOLATIONS:  # one after the other in one folder: each its own cache
        got[name] = np.array(load_split(data_root, "digits", "val200", size, name, progress=False).images)
        with_pil = Image.Resampling[name.upper()]
        for i in (0, 57, 199):
            with Image.open(paths[i]) as im:
                want = np.asarray(im.convert("RGB").resize((size, size), with_pil))
            assert np.array_equal(got[name][i], want), (name, i)
    for a, b in combinations(got, 2):  # so that an ignored interpolation cannot pass
        assert (got[a] != got[b]).mean() > 0.05, (a, b)


# --- 5. evaluation: the mean over the split, every image once ----------------------------------------------------

def random_split(n: int, size: int = 6, classes: int = 4, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, classes, n), cache=None)


def pixels(x: torch.Tensor) -> list[str]:
    """The digests of a batch that reached the model (float in [0, 1], unnormalised) as uint8 HWC images."""
    images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [digest(im) for im in images]


def record_inputs(model: nn.Module, seen: list) -> None:
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, pixels(args[0]))))


@pytest.mark.parametrize("n,batch", [(23, 8), (5, 8)])  # 8 + 8 + 7; one batch smaller than the eval batch
def test_evaluate_is_the_mean_over_the_split_of_a_naive_loop(n, batch):
    split = random_split(n)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    reference = copy.deepcopy(model).double()
    seen = []
    record_inputs(model, seen)
    acc, loss, preds = train_module.evaluate(model, Batches(split, batch), Recipe())
    losses, correct, predicted = [], 0, []
    with torch.no_grad():
        for image, label in zip(split.images, split.labels):  # one image at a time, in float64
            logits = reference(torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255)
            top2 = logits[0].topk(2).values
            assert top2[0] - top2[1] > 1e-4  # no near-tie: fp32 and float64 pick the same class
            losses.append(F.cross_entropy(logits, torch.tensor([label])).item())
            correct += int(logits.argmax() == label)
            predicted.append(int(logits.argmax()))
    assert acc == pytest.approx(100 * correct / n, rel=1e-12) and 0 < correct < n
    assert preds.tolist() == predicted  # the predicted label of every image, in the split's order
    assert loss == pytest.approx(sum(losses) / n, rel=1e-5)
    assert [len(keys) for _, keys in seen] == [batch] * (n // batch) + ([n % batch] if n % batch else [])
    assert not any(training for training, _ in seen)
    assert Counter(k for _, keys in seen for k in keys) == Counter(digest(im) for im in split.images)


# --- 6. training: full batches only; evaluation: every image once ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("eval_split,batch", [("val200", 64), ("test", 48)])
def test_a_run_drops_the_last_incomplete_batch_and_evaluates_every_image_once(data_root, tmp_path, monkeypatch,
                                                                             eval_split, batch):
    """train800 = 12 x 64 + 32 (val200 = 200 < the eval batch of 256); train800val200 = 20 x 48 + 40
    (test = 797 = 3 x 256 + 29). Bilinear, so the images the model sees also show the recipe's interpolation."""
    seen, steps = [], []
    build, make_optimizer = run_module.build_model, train_module.make_optimizer

    def build_recording(*args, **kwargs):
        model = build(*args, **kwargs)
        record_inputs(model, seen)
        return model

    def counting_optimizer(*args):
        optimizer = make_optimizer(*args)
        optimizer.register_step_post_hook(lambda *_: steps.append(1))
        return optimizer

    monkeypatch.setattr(run_module, "build_model", build_recording)
    monkeypatch.setattr(train_module, "make_optimizer", counting_optimizer)
    epochs = 2
    recipe = {"image_size": 32, "batch_size": batch, "epochs": epochs, "eval_every": 1, "warmup_epochs": 0,
              "interpolation": "bilinear", "checkpoint_every": 100}
    spec = RunSpec("vit-tiny", "digits", "linear", {}, 0, eval_split, recipe)
    record = read_record(execute(spec, tmp_path, data_root, progress=False))

    def images(split):
        return Counter(digest(im) for im in load_split(data_root, "digits", split, 32, "bilinear",
                                                       progress=False).images)
    train_images, eval_images = images(spec.train_split), images(eval_split)
    n_train = sum(train_images.values())
    full = n_train // batch
    assert n_train % batch and full > 0
    assert len(steps) == epochs * full and record["train_images"] == epochs * full * batch
    trained = [keys for training, keys in seen if training]
    assert [len(keys) for keys in trained] == [batch] * (epochs * full)
    for e in range(epochs):
        epoch = Counter(k for keys in trained[e * full:(e + 1) * full] for k in keys)
        assert max(epoch.values()) == 1 and not epoch - train_images  # distinct images of the train split
    evaluated = [keys for training, keys in seen if not training]
    per_eval = -(-sum(eval_images.values()) // 256)
    assert len(evaluated) == epochs * per_eval and [e["epoch"] for e in record["evaluations"]] == [1, 2]
    for e in range(epochs):
        assert Counter(k for keys in evaluated[e * per_eval:(e + 1) * per_eval] for k in keys) == eval_images
