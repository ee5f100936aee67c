"""Task definitions against VTAB: label functions, image conversions, split arithmetic."""
import numpy as np
import pytest

from vtab_lily.tasks import TASKS, VTAB_TASKS, Slice, get_task


def test_nineteen_tasks_in_three_groups():
    groups = [TASKS[t].group for t in VTAB_TASKS]
    assert len(VTAB_TASKS) == 19
    assert (groups.count("Natural"), groups.count("Specialized"), groups.count("Structured")) == (7, 4, 8)


@pytest.mark.parametrize("alias,name", [("cifar", "cifar100"), ("oxford_iiit_pet", "pets"), ("oxford_pet", "pets"),
                                        ("patch_camelyon", "camelyon"), ("diabetic_retinopathy", "retinopathy"),
                                        ("oxford_flowers102", "flowers102")])
def test_community_aliases(alias, name):
    assert get_task(alias).name == name


def test_unknown_task_lists_the_names():
    with pytest.raises(KeyError, match="unknown task 'cifar10'.*cifar100"):
        get_task("cifar10")


# (task, train800, val200, test), written from task_adaptation/data/*.py
SPLIT_TABLE = [
    ("cifar100", Slice("train", 0, 800), Slice("train", 45_000, 45_200), Slice("test")),
    ("caltech101", Slice("train", 0, 800), Slice("train", 2_754, 2_954), Slice("test")),
    ("dtd", Slice("train", 0, 800), Slice("validation", 0, 200), Slice("test")),
    ("pets", Slice("train", 0, 800), Slice("train", 2_944, 3_144), Slice("test")),
    ("svhn", Slice("train", 0, 800), Slice("train", 65_931, 66_131), Slice("test")),
    ("sun397", Slice("train", 0, 800), Slice("validation", 0, 200), Slice("test")),
    ("eurosat", Slice("train", 0, 800), Slice("train", 16_200, 16_400), Slice("train", 21_600)),
    ("resisc45", Slice("train", 0, 800), Slice("train", 18_900, 19_100), Slice("train", 25_200)),
    ("clevr_count", Slice("train", 0, 800), Slice("train", 63_000, 63_200), Slice("validation")),
    ("clevr_dist", Slice("train", 0, 800), Slice("train", 63_000, 63_200), Slice("validation")),
    ("kitti", Slice("train", 0, 800), Slice("validation", 0, 200), Slice("test")),
    ("dsprites_loc", Slice("train", 0, 800), Slice("train", 589_824, 590_024), Slice("train", 663_552)),
    ("dsprites_ori", Slice("train", 0, 800), Slice("train", 589_824, 590_024), Slice("train", 663_552)),
    ("smallnorb_azi", Slice("train", 0, 800), Slice("test", 0, 200), Slice("test", 12_150)),
    ("smallnorb_ele", Slice("train", 0, 800), Slice("test", 0, 200), Slice("test", 12_150)),
]


@pytest.mark.parametrize("name,train,val,test", SPLIT_TABLE)
def test_split_arithmetic(name, train, val, test):
    task = TASKS[name]
    assert (task.train800, task.val200, task.test) == (train, val, test)
    assert task.slices["train800val200"] == [train, val]


def _objects(n, depth=9.0):
    return {"size": np.zeros(n), "pixel_coords": np.array([[10.0, 20.0, depth + i] for i in range(n)])}


@pytest.mark.parametrize("n,label", [(3, 0), (5, 2), (10, 7)])
def test_clevr_count(n, label):
    assert TASKS["clevr_count"].label({"objects": _objects(n)}) == label


@pytest.mark.parametrize("closest,label", [(7.9, 0), (8.2, 1), (8.5, 1), (8.7, 2), (9.2, 3), (9.7, 4), (12.0, 5)])
def test_clevr_distance_bins(closest, label):
    assert TASKS["clevr_dist"].label({"objects": _objects(4, closest)}) == label


@pytest.mark.parametrize("types,zs,label", [
    ([0, 1], [25.0, 12.0], 1),       # closest vehicle at 12 m -> (8, 20]
    ([3, 0], [2.0, 30.0], 2),        # the pedestrian (type 3) at 2 m is ignored
    ([2], [5.0], 0),                 # a truck at 5 m
    ([4, 5], [3.0, 4.0], 3),         # no vehicle: distance 1000 -> last bin
    ([], [], 3),
])
def test_kitti_closest_vehicle(types, zs, label):
    loc = np.array([[0.0, 0.0, z] for z in zs]).reshape(-1, 3)
    assert TASKS["kitti"].label({"objects": {"type": np.array(types), "location": loc}}) == label


@pytest.mark.parametrize("x,label", [(0, 0), (1, 0), (2, 1), (31, 15)])
def test_dsprites_location_bins(x, label):
    assert TASKS["dsprites_loc"].label({"label_x_position": x}) == label


@pytest.mark.parametrize("o,label", [(0, 0), (2, 0), (3, 1), (5, 2), (39, 15)])
def test_dsprites_orientation_bins(o, label):
    assert TASKS["dsprites_ori"].label({"label_orientation": o}) == label


def test_smallnorb_labels_and_images():
    ex = {"label_azimuth": 17, "label_elevation": 8, "image": np.full((96, 96, 1), 77, np.uint8),
          "image2": np.zeros((96, 96, 1), np.uint8)}
    assert TASKS["smallnorb_azi"].label(ex) == 17 and TASKS["smallnorb_ele"].label(ex) == 8
    img = TASKS["smallnorb_azi"].image(ex)
    assert img.shape == (96, 96, 3) and (img == 77).all()  # `image`, not `image2`, tiled


def test_dsprites_images_are_tiled_and_scaled():
    raw = np.zeros((64, 64, 1), np.uint8)
    raw[10, 20] = 1
    img = TASKS["dsprites_loc"].image({"image": raw})
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img[10, 20].tolist() == [255, 255, 255] and img.sum() == 3 * 255
