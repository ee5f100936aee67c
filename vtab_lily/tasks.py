"""The 19 VTAB-1K tasks (+ the offline `digits` task), exactly as VTAB defines them.

Sources: google-research/task_adaptation `task_adaptation/data/*.py` (splits and label functions) and
the community VTAB-1K folder layout. Every slice is absolute, computed from the split-size table below,
so nothing depends on tfds metadata at run time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

GROUPS = ("Natural", "Specialized", "Structured")
SPLITS = ("train800", "val200", "train800val200", "test")

# tfds split sizes of the VTAB versions (used for carve-outs and percentage slices).
SPLIT_SIZES = {
    "cifar100": {"train": 50_000, "test": 10_000},
    "caltech101": {"train": 3_060, "test": 6_084},
    "dtd": {"train": 1_880, "validation": 1_880, "test": 1_880},
    "oxford_flowers102": {"train": 1_020, "validation": 1_020, "test": 6_149},
    "oxford_iiit_pet": {"train": 3_680, "test": 3_669},
    "svhn_cropped": {"train": 73_257, "test": 26_032},
    "sun397/tfds": {"train": 76_128, "validation": 10_875, "test": 21_750},
    "patch_camelyon": {"train": 262_144, "validation": 32_768, "test": 32_768},
    "eurosat/rgb": {"train": 27_000},
    "resisc45": {"train": 31_500},
    "diabetic_retinopathy_detection/btgraham-300": {"train": 35_126, "validation": 10_906, "test": 42_670},
    "clevr": {"train": 70_000, "validation": 15_000, "test": 15_000},
    "dmlab": {"train": 65_550, "validation": 22_628, "test": 22_735},
    "kitti": {"train": 6_347, "validation": 423, "test": 711},
    "dsprites": {"train": 737_280},
    "smallnorb": {"train": 24_300, "test": 24_300},
}


@dataclass(frozen=True)
class Slice:
    """Examples [start, stop) of a tfds split (stop None: to the end)."""

    split: str
    start: int = 0
    stop: int | None = None

    def indices(self, available: int) -> range:
        """The example indices, clipped to what the source holds (mock data holds few)."""
        stop = available if self.stop is None else min(self.stop, available)
        return range(min(self.start, stop), stop)


def label_key(key: str) -> Callable[[dict], int]:
    return lambda ex: int(ex[key])


def binned(key: str, factor: float) -> Callable[[dict], int]:
    """dSprites: a 32-valued (or 40-valued) attribute folded into 16 classes."""
    return lambda ex: int(np.floor(float(ex[key]) / factor))


def threshold_label(value: float, thresholds) -> int:
    """VTAB's binning: the largest i with thresholds[i] < value."""
    return int(np.max(np.nonzero(np.asarray(thresholds) < value)[0]))


def clevr_count(ex: dict) -> int:
    return len(ex["objects"]["size"]) - 3


def clevr_distance(ex: dict) -> int:
    dist = float(np.min(np.asarray(ex["objects"]["pixel_coords"])[:, 2]))
    return threshold_label(dist, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def kitti_closest_vehicle(ex: dict) -> int:
    """Distance bin of the closest Car, Van or Truck (type < 3); no vehicle counts as 1000."""
    objects = ex["objects"]
    z = np.asarray(objects["location"], dtype=np.float64).reshape(-1, 3)[:, 2]
    vehicles = z[np.asarray(objects["type"]) < 3]
    return threshold_label(float(np.min(np.append(vehicles, 1000.0))), [-100.0, 8.0, 20.0, 999.0])


def rgb(ex: dict) -> np.ndarray:
    return np.asarray(ex["image"], dtype=np.uint8)


def gray_to_rgb(scale: int) -> Callable[[dict], np.ndarray]:
    """1-channel images tiled to 3 channels (dSprites is {0,1}: times 255)."""
    return lambda ex: np.repeat(np.asarray(ex["image"], dtype=np.uint8) * scale, 3, axis=-1)


@dataclass(frozen=True)
class Task:
    name: str
    group: str
    num_classes: int
    builder: str  # tfds name, without version
    version: str  # tfds version pattern VTAB used
    train800: Slice
    val200: Slice
    test: Slice
    label: Callable[[dict], int] = label_key("label")
    image: Callable[[dict], np.ndarray] = rgb
    aliases: tuple[str, ...] = ()
    note: str = ""
    manual: str = ""  # manual-download instructions, if tfds cannot download it
    slices: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "slices", {"train800": [self.train800], "val200": [self.val200],
                                            "train800val200": [self.train800, self.val200], "test": [self.test]})


def _carved(builder: str, train: float, val: float | None = None) -> dict:
    """Val200 carved from train at tc = train% of the train split. Pattern A (val None): test = the test
    split; pattern C: test = train[tc + vc:] with vc = val% of the train split."""
    n = SPLIT_SIZES[builder]["train"]
    tc = int(n * train)
    test = Slice("test") if val is None else Slice("train", tc + int(n * val))
    return dict(train800=Slice("train", 0, 800), val200=Slice("train", tc, tc + 200), test=test)


def _own_validation() -> dict:
    """Pattern B: train[:800], validation[:200], test."""
    return dict(train800=Slice("train", 0, 800), val200=Slice("validation", 0, 200), test=Slice("test"))


_CLEVR = {**_carved("clevr", 0.9), "test": Slice("validation")}
_DSPRITES = _carved("dsprites", 0.8, 0.1)
_NORB = dict(train800=Slice("train", 0, 800), val200=Slice("test", 0, 200),
             test=Slice("test", SPLIT_SIZES["smallnorb"]["test"] // 2))

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("cifar100", "Natural", 100, "cifar100", "3.*.*", **_carved("cifar100", 0.9), aliases=("cifar",)),
    Task("caltech101", "Natural", 102, "caltech101", "3.*.*", **_carved("caltech101", 0.9)),
    Task("dtd", "Natural", 47, "dtd", "3.*.*", **_own_validation()),
    Task("flowers102", "Natural", 102, "oxford_flowers102", "2.*.*", **_own_validation(),
         aliases=("oxford_flowers102",)),
    Task("pets", "Natural", 37, "oxford_iiit_pet", "4.*.*", **_carved("oxford_iiit_pet", 0.8),
         aliases=("oxford_iiit_pet", "oxford_pet"),
         note="VTAB used oxford_iiit_pet 3.x, which tfds no longer serves; 4.0.0 is used (example order may differ)"),
    Task("svhn", "Natural", 10, "svhn_cropped", "3.*.*", **_carved("svhn_cropped", 0.9)),
    Task("sun397", "Natural", 397, "sun397/tfds", "4.*.*", **_own_validation()),
    Task("camelyon", "Specialized", 2, "patch_camelyon", "2.*.*", **_own_validation(),
         aliases=("patch_camelyon",)),
    Task("eurosat", "Specialized", 10, "eurosat/rgb", "2.*.*", **_carved("eurosat/rgb", 0.6, 0.2)),
    Task("resisc45", "Specialized", 45, "resisc45", "3.*.*", **_carved("resisc45", 0.6, 0.2),
         manual="download NWPU-RESISC45.rar (https://www.tensorflow.org/datasets/catalog/resisc45) and put it "
                "in <data-dir>/downloads/manual/"),
    Task("retinopathy", "Specialized", 5, "diabetic_retinopathy_detection/btgraham-300", "3.*.*",
         **_own_validation(), aliases=("diabetic_retinopathy",),
         manual="download the Kaggle 'diabetic-retinopathy-detection' files (train.zip.00*, test.zip.00*, "
                "trainLabels.csv, sample.zip; https://www.kaggle.com/c/diabetic-retinopathy-detection/data) and "
                "put them in <data-dir>/downloads/manual/"),
    Task("clevr_count", "Structured", 8, "clevr", "3.*.*", **_CLEVR, label=clevr_count),
    Task("clevr_dist", "Structured", 6, "clevr", "3.*.*", **_CLEVR, label=clevr_distance),
    Task("dmlab", "Structured", 6, "dmlab", "2.0.1", **_own_validation()),
    Task("kitti", "Structured", 4, "kitti", "3.1.0", **_own_validation(), label=kitti_closest_vehicle,
         note="VTAB used kitti 3.1.0; NOAH/VPT used 3.2.0"),
    Task("dsprites_loc", "Structured", 16, "dsprites", "2.*.*", **_DSPRITES,
         label=binned("label_x_position", 2.0), image=gray_to_rgb(255)),
    Task("dsprites_ori", "Structured", 16, "dsprites", "2.*.*", **_DSPRITES,
         label=binned("label_orientation", 2.5), image=gray_to_rgb(255)),
    Task("smallnorb_azi", "Structured", 18, "smallnorb", "2.*.*", **_NORB, label=label_key("label_azimuth"),
         image=gray_to_rgb(1)),
    Task("smallnorb_ele", "Structured", 9, "smallnorb", "2.*.*", **_NORB, label=label_key("label_elevation"),
         image=gray_to_rgb(1)),
]}
VTAB_TASKS = tuple(TASKS)  # the 19, in the paper's column order

# digits: scikit-learn's bundled 1,797 handwritten 8x8 digits, split VTAB-style (offline demos and tests).
TASKS["digits"] = Task("digits", "Offline", 10, "sklearn.load_digits", "bundled",
                       train800=Slice("train", 0, 800), val200=Slice("train", 800, 1000),
                       test=Slice("train", 1000), note="not a VTAB task: scikit-learn's digits, for offline demos")

ALIASES = {alias: t.name for t in TASKS.values() for alias in t.aliases}


def get_task(name: str) -> Task:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of {list(TASKS)} (aliases: {sorted(ALIASES)})")
    return TASKS[name]
