"""The offline mini-benchmark: mini VTAB tasks, the mini backbones' shipped weights and their pretraining,
and a learning slice (pretrained vit-mini, a couple of methods x tasks) that fails when training breaks."""
import numpy as np
import pytest
import torch

from backbones import WeightsError, create_backbone
from backbones.pretrain import PRETRAINING, Pretraining, pretrain
from backbones.pretrain import main as pretrain_main
from backbones.shapes import SOURCE_CLASSES
from backbones.weights import SHIPPED, sha256, shipped_path
from vtab_lily.minitasks import SOURCES
from vtab_lily.prepare import prepare_task
from vtab_lily.records import RunSpec, read_record
from vtab_lily.run import execute
from vtab_lily.tasks import GROUPS, MINI_TASKS, TASKS


def test_mini_vtab_has_two_tasks_per_group_or_more():
    groups = [TASKS[t].group for t in MINI_TASKS]
    assert len(MINI_TASKS) >= 6 and all(groups.count(g) >= 2 for g in GROUPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mini_count", "mini_loc", "mini_ori", "mini_sensor"])
def test_generated_splits_are_deterministic_and_cover_every_class(name):
    task = TASKS[name]
    train, again = SOURCES[name]("train"), SOURCES[name]("train")
    assert len(train) == 1000 and all((a["image"] == b["image"]).all() for a, b in zip(train, again))
    assert train[0]["image"].shape == (32, 32, 3) and train[0]["image"].dtype == np.uint8
    labels = np.array([e["label"] for e in train])
    assert sorted(set(labels)) == list(range(task.num_classes))
    test = SOURCES[name]("test")
    assert not any((a["image"] == b["image"]).all() for a, b in zip(train[:50], test[:50]))


@pytest.mark.slow
def test_prepare_writes_the_vtab_layout_deterministically(tmp_path):
    first, second = (prepare_task("mini_ori", tmp_path / d) for d in ("a", "b"))
    assert first["counts"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 1000}
    assert first["sha256"] == second["sha256"] and first["group"] == "Structured"
    for rel in ("images/train800/000000.png", "images/test/000999.png"):
        assert (tmp_path / "a/mini_ori" / rel).read_bytes() == (tmp_path / "b/mini_ori" / rel).read_bytes()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_load_and_match_their_checksum(name):
    assert sha256(shipped_path(name)) == SHIPPED[name]
    torch.manual_seed(0)
    pretrained = create_backbone(name, 10)
    torch.manual_seed(0)
    random = create_backbone(name, 10, pretrained=False)
    from safetensors.torch import load_file
    saved = load_file(str(shipped_path(name)))
    for key, value in pretrained.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, saved[key]), key
    assert not torch.equal(pretrained.state_dict()["pos_embed"], random.state_dict()["pos_embed"])


def test_damaged_or_missing_weights_are_refused_in_one_line(tmp_path, monkeypatch):
    import backbones.weights as weights
    damaged = bytearray(shipped_path("vit-mini").read_bytes())
    damaged[-1] ^= 1
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsError, match=r"missing .*python -m backbones.pretrain --backbone vit-mini"):
        create_backbone("vit-mini", 10)
    (tmp_path / "vit-mini.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(WeightsError) as e:
        create_backbone("vit-mini", 10)
    assert "damaged" in str(e.value) and "\n" not in str(e.value) and "git checkout" in str(e.value)


@pytest.mark.parametrize("name", sorted(PRETRAINING))
def test_pretraining_is_deterministic(name):
    short = Pretraining(steps=2, batch_size=8, warmup_steps=1)
    first, second = (pretrain(name, short, log=lambda _: None).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(short.seed)
    init = create_backbone(name, SOURCE_CLASSES, pretrained=False, drop_path_rate=0.0).state_dict()
    assert not torch.equal(init["patch_embed.proj.weight"], first["patch_embed.proj.weight"])


def test_pretrain_cli_rejects_bad_steps(capsys):
    assert pretrain_main(["--backbone", "vit-mini", "--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --steps")


def _acc(tmp_path, method, task, pretrained=True, epochs=5):
    spec = RunSpec("vit-mini", task, method, {}, 0, "test", {"epochs": epochs})
    runs = tmp_path / ("runs" if pretrained else "runs-random")
    return read_record(execute(spec, runs, tmp_path / "data", prepare=True, pretrained=pretrained,
                               progress=False))["best_acc"]


@pytest.mark.slow
def test_learning_slice(tmp_path):
    """Pretrained vit-mini, 5 epochs: the must-show gaps of the mini-benchmark, at CI size."""
    linear, lily = _acc(tmp_path, "linear", "digits"), _acc(tmp_path, "lily", "digits")
    random_linear = _acc(tmp_path, "linear", "digits", pretrained=False)
    ori_linear, ori_lily = _acc(tmp_path, "linear", "mini_ori"), _acc(tmp_path, "lily", "mini_ori")
    print(f"digits: linear {linear} (random init {random_linear}), lily {lily}; mini_ori: linear {ori_linear}, "
          f"lily {ori_lily}")
    assert linear >= random_linear + 20
    assert lily >= 70
    assert ori_lily >= ori_linear + 10


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path):
    """The mini table is deterministic on the CPU: a run repeated with the same seed gives the same record."""
    spec = RunSpec("vim-mini", "mini_loc", "lily", {}, 3, "test", {"epochs": 1})
    first = read_record(execute(spec, tmp_path / "runs", tmp_path / "data", prepare=True, progress=False))
    again = read_record(execute(spec, tmp_path / "runs", tmp_path / "data", force=True, progress=False))
    assert first["evaluations"] == again["evaluations"] and first["train_losses"] == again["train_losses"]


@pytest.mark.slow
def test_load_model_follows_the_runs_weights_and_image_size(tmp_path):
    """load_model rebuilds a --random-init run on its seed's random backbone (it was rebuilt on the
    pretrained one: 5.52% against the record's 23.34%) and a pretrained run on the shipped weights, at the
    run's 32 px: each scores the record's final accuracy. A local weights file is checked by its hash."""
    import shutil

    from vtab_lily import load_model
    from vtab_lily.data import Batches, load_split
    from vtab_lily.model import ProvenanceError
    from vtab_lily.train import evaluate
    runs, data = tmp_path / "runs", tmp_path / "data"
    recipe = {"epochs": 1, "lr": 1e-2}
    split = None
    for pretrained in (False, True):
        spec = RunSpec("vit-mini", "digits", "lora", {"r": 2}, 5, "test", recipe)
        path = execute(spec, runs, data, prepare=True, pretrained=pretrained, progress=False)
        record = read_record(path)
        assert record["provenance"]["weights"]["source"] == ("shipped" if pretrained else "random")
        model = load_model(path.with_suffix(".safetensors"))
        assert model.patch_embed.img_size == (32, 32)
        split = split or load_split(data, "digits", "test", size=32, progress=False)
        acc = evaluate(model, Batches(split, 256), spec.full_recipe()).acc
        assert acc == pytest.approx(record["final_acc"], abs=1e-9)
        with pytest.raises(ProvenanceError, match="trained with backbone options"):
            load_model(path.with_suffix(".safetensors"), backbone_options={"img_size": 224})
    with pytest.raises(ProvenanceError, match="pretrained"):
        load_model(path.with_suffix(".safetensors"), pretrained=False)
    from safetensors.torch import save_file
    local, shipped = tmp_path / "mine.safetensors", tmp_path / "shipped.safetensors"
    plain = create_backbone("vit-mini", 10, pretrained=False, img_size=32)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items() if not k.startswith("head")}, str(local))
    shutil.copy(shipped_path("vit-mini"), shipped)
    spec = RunSpec("vit-mini", "digits", "linear", {}, 5, "test", recipe)
    path = execute(spec, runs, data, weights=str(local), progress=False).with_suffix(".safetensors")
    with pytest.raises(ProvenanceError, match="local weights file .*pass that file"):
        load_model(path)
    assert torch.equal(load_model(path, weights=str(local)).pos_embed, plain.pos_embed)
    with pytest.raises(ProvenanceError, match="sha256 .* but weights file .*shipped.safetensors has sha256"):
        load_model(path, weights=str(shipped))


@pytest.mark.slow
def test_mini_count_draws_one_separated_shape_per_patch():
    """mini_count sat at chance for every method (14-25%): its 1-8 small shapes straddled the 8 px patches.
    Now each shape lies inside its own patch in a contrasting shade, so the label is exactly the number of
    patches holding one (a patch holds one when >= 4 pixels differ from its median colour by > 50 / 255)."""
    for split in ("train", "test"):
        for e in SOURCES["mini_count"](split):
            p = e["image"].astype(np.float32).reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, 64, 3)
            deviation = np.abs(p - np.median(p, axis=1, keepdims=True)).max(-1)
            assert ((deviation > 50).sum(1) >= 4).sum() == e["label"] + 1
