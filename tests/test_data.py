"""Preparing VTAB-1K (tfds mock data), reading it back, its errors, and the decode-once cache."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_checks import assert_disjoint, listed_digests

from vtab_lily.data import Batches, DataError, load_split, read_list, to_float
from vtab_lily.prepare import PrepareError, prepare_task
from vtab_lily.tasks import SPLIT_SIZES, TASKS, VTAB_TASKS

tfds = pytest.importorskip("tensorflow_datasets")


class SceneSource:
    """A lazy, full-size mock split of clevr or kitti scenes whose object fields agree in length (tfds'
    random mock draws each sequence feature's length independently, 5..49, so scenes are inconsistent)."""

    def __init__(self, builder, n):
        self.builder, self.n = builder, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        k = int(rng.integers(3, 11))
        image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
        if self.builder == "clevr":
            coords = np.column_stack([rng.uniform(0, 480, k), rng.uniform(0, 320, k), rng.uniform(7, 13, k)])
            return {"image": image, "objects": {"size": np.zeros(k, np.int64), "pixel_coords": coords}}
        location = np.column_stack([rng.uniform(-10, 10, (k, 2)), rng.uniform(2, 60, k)])
        return {"image": image, "objects": {"type": rng.integers(0, 8, k), "location": location}}


def _scene_source(self, split, *args, **kwargs):
    return SceneSource(self.name, SPLIT_SIZES[self.name][split])


@pytest.mark.parametrize("name", VTAB_TASKS)
def test_prepare_under_tfds_mock_data_writes_the_four_lists(name, tmp_path):
    task = TASKS[name]
    kw = {"as_data_source_fn": _scene_source} if task.builder in ("clevr", "kitti") else {}
    # Full-size lazy mock splits, so VTAB's absolute slices exist; --limit keeps 6 examples per split.
    with tfds.testing.mock_data(num_examples=737_280, **kw):
        manifest = prepare_task(name, tmp_path, limit=6)
    assert manifest["counts"] == {"train800": 6, "val200": 6, "train800val200": 12, "test": 6}
    for split in ("train800", "val200", "train800val200", "test"):
        paths, labels = read_list(tmp_path / name, split, task.num_classes)
        assert len(paths) == manifest["counts"][split]
        assert ((labels >= 0) & (labels < task.num_classes)).all()
    assert set(manifest["sha256"]) == {"train800.txt", "val200.txt", "train800val200.txt", "test.txt"}
    # slices of one tfds split share no image (mock example i is the same in every split: compare only these)
    for source in {task.slices[s][0].split for s in ("train800", "val200", "test")}:
        same = [s for s in ("train800", "val200", "test") if task.slices[s][0].split == source]
        assert_disjoint({s: listed_digests(tmp_path / name, s, task.num_classes) for s in same})


def test_manual_download_tasks_say_what_to_fetch(tmp_path):
    with pytest.raises(PrepareError, match="NWPU-RESISC45.rar.*downloads/manual"):
        prepare_task("resisc45", tmp_path, data_dir=str(tmp_path / "tfds"), download=True)
    assert not (tmp_path / "resisc45" / "manifest.json").exists()


def test_mock_split_too_short_is_an_error(tmp_path):
    with tfds.testing.mock_data(num_examples=10), pytest.raises(PrepareError, match="holds 10 examples"):
        prepare_task("cifar100", tmp_path)
    assert not list(tmp_path.glob("cifar100/*.txt"))


def test_digits_round_trip_is_pixel_exact(tmp_path):
    from sklearn.datasets import load_digits
    manifest = prepare_task("digits", tmp_path)
    assert manifest["counts"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
    digits = load_digits()
    paths, labels = read_list(tmp_path / "digits", "test", 10)
    assert (labels == digits.target[1000:]).all()
    png = np.asarray(Image.open(paths[5]))
    assert (png[..., 0] == np.round(digits.images[1005] * 255 / 16)).all()
    split = load_split(tmp_path, "digits", "val200", size=8, interpolation="nearest", progress=False)
    assert (split.images[:, :, :, 1] == np.round(digits.images[800:1000] * 255 / 16)).all()
    assert (split.labels == digits.target[800:1000]).all()


def _community_folder(root, n=4, classes=3):
    """A community-style JPEG folder: oxford_iiit_pet/images/test/*.jpg + test.txt."""
    folder = root / "oxford_iiit_pet"
    (folder / "images" / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(
            folder / "images" / "test" / f"{i:06d}.jpg", quality=75)
        lines.append(f"images/test/{i:06d}.jpg {i % classes}")
    (folder / "test.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_community_jpeg_folder_is_read_through_its_alias(tmp_path):
    folder = _community_folder(tmp_path)
    split = load_split(tmp_path, "pets", "test", progress=False)
    assert split.images.shape == (4, 224, 224, 3)
    want = np.asarray(Image.open(folder / "images/test/000002.jpg").convert("RGB").resize((224, 224), Image.BICUBIC))
    assert (split.images[2] == want).all()
    assert split.labels.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "test.txt").unlink(), "missing list file .*test.txt"),
    (lambda f: (f / "images/test/000001.jpg").unlink(), r"test.txt:2: image .*000001.jpg does not exist"),
    (lambda f: (f / "images/test/000003.jpg").write_bytes(b"not a jpeg"), "corrupt image .*000003.jpg"),
    (lambda f: (f / "test.txt").write_text("images/test/000000.jpg 37\n"), r"test.txt:1: label 37 outside 0..36"),
    (lambda f: (f / "test.txt").write_text("images/test/000000.jpg\n"), r"test.txt:1: expected '<image path>"),
])
def test_bad_inputs_give_one_clear_error_and_no_cache(tmp_path, damage, message):
    folder = _community_folder(tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=message):
        load_split(tmp_path, "pets", "test", progress=False)
    assert not list((folder / ".cache").glob("*.npy")) if (folder / ".cache").exists() else True


def test_missing_task_folder_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="python -m vtab_lily.prepare --task dtd"):
        load_split(tmp_path, "dtd", "test")


def test_cache_is_reused_and_rebuilt_when_sources_or_settings_change(tmp_path):
    folder = _community_folder(tmp_path)
    first = load_split(tmp_path, "pets", "test", progress=False)
    mtime = os.path.getmtime(first.cache)
    again = load_split(tmp_path, "pets", "test", progress=False)
    assert again.cache == first.cache and os.path.getmtime(again.cache) == mtime
    assert json.loads((folder / ".cache" / "test.checksum").read_text())["checksum"] in first.cache.name
    smaller = load_split(tmp_path, "pets", "test", size=32, progress=False)
    assert smaller.cache != first.cache and smaller.images.shape[1:] == (32, 32, 3)
    bilinear = load_split(tmp_path, "pets", "test", interpolation="bilinear", progress=False)
    assert bilinear.cache != first.cache
    Image.fromarray(np.zeros((50, 40, 3), np.uint8)).save(folder / "images/test/000000.jpg")
    os.utime(folder / "images/test/000000.jpg", ns=(1, 1))  # even a file whose mtime goes back is noticed
    changed = load_split(tmp_path, "pets", "test", progress=False)
    assert changed.cache != first.cache and not first.cache.exists()  # stale cache removed
    assert changed.images[0].max() == 0


@pytest.mark.slow
def test_batches_shuffle_reproducibly_and_normalise(tmp_path):
    prepare_task("digits", tmp_path)
    split = load_split(tmp_path, "digits", "train800", size=16, progress=False)
    a = Batches(split, 64, shuffle=True, drop_last=True, seed=3)
    b = Batches(split, 64, shuffle=True, drop_last=True, seed=3)
    assert len(a) == 12
    (xa, ya), (xb, yb) = next(iter(a)), next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(1)
    assert not torch.equal(next(iter(a))[1], ya)
    raw, _ = next(iter(Batches(split, 8)))
    assert raw.shape == (8, 3, 16, 16) and raw.dtype == torch.uint8
    assert torch.equal(raw.permute(0, 2, 3, 1), torch.from_numpy(np.array(split.images[:8])))
    x = to_float(raw)
    assert x.dtype == torch.float32 and torch.equal(x * 255, raw.float())
    assert torch.allclose(to_float(raw, normalize=True)[:, 0], (x[:, 0] - 0.485) / 0.229)


@pytest.mark.slow
def test_interrupted_prepare_continues_and_a_finished_task_is_skipped(tmp_path):
    prepare_task("digits", tmp_path)
    folder = tmp_path / "digits"
    # as if killed half-way through the test split: no manifest, no lists, half the images
    (folder / "manifest.json").unlink()
    for split in ("train800", "val200", "train800val200", "test"):
        (folder / f"{split}.txt").unlink()
    images = sorted((folder / "images" / "test").glob("*.png"))
    for p in images[400:]:
        p.unlink()
    kept = {p: p.stat().st_mtime_ns for p in images[:400]}
    manifest = prepare_task("digits", tmp_path)
    assert manifest["counts"]["test"] == 797 and len(list((folder / "images" / "test").glob("*.png"))) == 797
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished images were not rewritten
    before = (folder / "manifest.json").stat().st_mtime_ns
    prepare_task("digits", tmp_path)
    assert (folder / "manifest.json").stat().st_mtime_ns == before


def test_jpeg_format_writes_quality_75_files_like_the_community_copy(tmp_path):
    manifest = prepare_task("digits", tmp_path, fmt="jpeg", limit=5)
    assert manifest["format"] == "jpeg" and manifest["counts"]["test"] == 5
    paths, _ = read_list(tmp_path / "digits", "test", 10)
    assert all(p.suffix == ".jpg" for p in paths)
    q75 = tmp_path / "q75.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(q75, quality=75)
    with Image.open(paths[0]) as im, Image.open(q75) as ref:
        assert im.format == "JPEG" and im.quantization == ref.quantization  # the quality-75 tables
    assert load_split(tmp_path, "digits", "test", size=8, progress=False).images.shape == (5, 8, 8, 3)
    with pytest.raises(PrepareError, match="unknown format 'gif'"):
        prepare_task("digits", tmp_path / "other", fmt="gif")


def test_temps_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    from vtab_lily.fileio import HOST, STALE_TEMP_S
    prepare_task("digits", tmp_path, limit=4)
    cache_dir, images = tmp_path / "digits" / ".cache", tmp_path / "digits" / "images" / "test"
    cache_dir.mkdir()
    dead = cache_dir / f".test-16-bicubic-x.npy.{HOST}.999999999.ab12cd34.tmp"  # above any pid_max
    live = cache_dir / f".test-16-bicubic-y.npy.{HOST}.{os.getpid()}.ab12cd34.tmp"
    old, recent = (cache_dir / f".test-16-bicubic-z.npy.other-host.{n}.ab12cd34.tmp" for n in (11, 12))
    image_temp = images / f".000009.png.{HOST}.999999999.zz99yy88.tmp"
    list_temp = tmp_path / "digits" / f".test.txt.{HOST}.999999999.zz99yy88.tmp"
    for p in (dead, live, old, recent, image_temp, list_temp):
        p.write_bytes(b"\0" * 1000)
    os.utime(old, (0, 0))
    assert STALE_TEMP_S < 1e9
    load_split(tmp_path, "digits", "test", size=16, progress=False)
    assert not dead.exists() and not old.exists() and live.exists() and recent.exists()
    (tmp_path / "digits" / "manifest.json").unlink()  # prepare runs again over the image folders
    prepare_task("digits", tmp_path, limit=4)
    assert not image_temp.exists() and not list_temp.exists()


def test_damaged_cache_or_checksum_memo_is_rebuilt_with_a_warning(tmp_path, capsys):
    prepare_task("digits", tmp_path, limit=6)
    first = load_split(tmp_path, "digits", "test", size=8, progress=False)
    want = np.array(first.images)
    memo = tmp_path / "digits" / ".cache" / "test.checksum"
    capsys.readouterr()
    for damage, message in ((lambda: first.cache.write_bytes(first.cache.read_bytes()[:200]), "decoded-image cache"),
                            (lambda: first.cache.write_bytes(b"garbage"), "decoded-image cache"),
                            (lambda: memo.write_text('{"signature": '), "test.checksum is damaged")):
        damage()
        again = load_split(tmp_path, "digits", "test", size=8, progress=False)
        assert again.cache == first.cache and np.array_equal(np.array(again.images), want)
        err = capsys.readouterr().err
        assert err.startswith("warning: ") and message in err and err.count("\n") == 1
    assert json.loads(memo.read_text())["checksum"] in first.cache.name
