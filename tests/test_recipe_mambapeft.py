"""MambaPEFT's recipe: its values, its schedule against mmengine's LinearLR + CosineAnnealingLR restated,
gradient clipping against a naive norm, the no-decay names in the param groups, run ids of the recipes that
existed before it."""
import dataclasses
import hashlib
import math

import pytest
import torch

from vtab_lily import build_model, tables
from vtab_lily import run as run_cli
from vtab_lily.fileio import write_json
from vtab_lily.model import param_groups
from vtab_lily.recipes import RECIPES, recipe_for
from vtab_lily.records import RunSpec, digest, read_record, recipe_identity
from vtab_lily.rows import PRESETS, preset_label
from vtab_lily.run import execute
from vtab_lily.train import WarmupCosine

PROVENANCE = {"weights": {"source": "random", "seed": 0}, "data": {"lists_sha256": "0" * 64}, "precision": "fp32"}


def test_run_ids_of_the_earlier_recipes_are_unchanged():
    """Ids computed with the code before the fields recipe, lr_schedule, clip_grad, no_decay, drop_last."""
    ids = {("vim-s", "lora", (("r", 1), ("targets", ("in_proj",))), (), "cifar100"): "s42-defe4462ca",
           ("vit-b", "lily", (("r", 16),), (("epochs", 5),), "cifar100"): "s42-028104d53c",
           ("vim-mini", "fft", (), (), "mini_svhn"): "s42-a4047e21b0"}
    for (backbone, method, options, recipe, task), run_id in ids.items():
        spec = RunSpec(backbone, task, method, dict(options), 42, "test", dict(recipe), PROVENANCE)
        assert spec.run_id == run_id
        named = dataclasses.replace(spec, recipe={**dict(recipe), "recipe": "vim" if "vim" in backbone else "vit"})
        assert named.run_id == run_id  # naming the backbone's own recipe is the same run
    mpeft = RunSpec("vim-s", "cifar100", "lora", {"r": 1, "targets": ("in_proj",)}, 42, "test",
                    {"recipe": "mambapeft"}, PROVENANCE)
    assert mpeft.run_id != "s42-defe4462ca" and mpeft.identity()["recipe"]["recipe"] == "mambapeft"


def test_mambapeft_recipe_is_the_official_configs():
    r = recipe_for("vim-s", recipe="mambapeft")
    assert (r.lr, r.weight_decay, r.batch_size, r.drop_last, r.epochs, r.warmup_epochs, r.lr_min) == (
        1e-3, 1e-4, 32, False, 100, 10, 1e-5)
    assert (r.lr_schedule, r.warmup_lr_init / r.lr, r.clip_grad, r.drop_path, r.normalize) == (
        "mmengine", pytest.approx(1e-3), 5.0, 0.1, True)
    assert r.no_decay_1d and set(r.no_decay) == {"A_log", "A_b_log", "D", "D_b", "pos_embed", "cls_token"}
    mini = recipe_for("vim-mini", recipe="mambapeft")  # derived as RECIPES["vim-mini"] from RECIPES["vim"]
    assert mini == dataclasses.replace(r, epochs=10, warmup_epochs=0, image_size=32, drop_path=0.0)
    assert recipe_for("vim-mini") == RECIPES["vim-mini"] and recipe_for("vim-s").recipe is None
    assert recipe_identity("vim-s", {"recipe": "mambapeft"})["no_decay"] == list(r.no_decay)


def test_unknown_recipe_is_one_error_line(capsys, tmp_path):
    code = run_cli.main(["--backbone", "vim-tiny-test", "--task", "digits", "--method", "linear", "--set",
                         "recipe=mamba", "--runs", str(tmp_path), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: recipe must be one of ('vit', 'vim', 'mambapeft', 'vpetl')")
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())


def mmengine_lrs(lr, start_factor, eta_min, warmup_epochs, epochs, steps):
    """The lr of every optimizer step as mmengine computes it: LinearLR converted to iterations
    (begin 0, end warmup_epochs x steps, total_iters = end - begin - 1) and CosineAnnealingLR by epoch
    (begin warmup_epochs, end epochs, T_max = end - begin), both in their chained (recursive) form and
    with their _global_step / last_step counters (mmengine optim/scheduler/param_scheduler.py)."""
    end, total = warmup_epochs * steps, warmup_epochs * steps - 1
    t_max = epochs - warmup_epochs
    group = lr * start_factor  # LinearLR.__init__ -> step(): _global_step 0, last_step 0
    lin_global, lin_last, cos_global, cos_last = 0, 0, 0, -1  # the cosine's first step is out of its range
    out = []
    for _ in range(epochs):
        for _ in range(steps):
            out.append(group)
            lin_global += 1  # after_train_iter
            if 0 <= lin_global < end:
                lin_last += 1
                group *= 1 + (1 - start_factor) / (total * start_factor + (lin_last - 1) * (1 - start_factor))
        cos_global += 1  # after_train_epoch
        if warmup_epochs <= cos_global < epochs:
            cos_last += 1
            if cos_last > 0:
                group = ((1 + math.cos(math.pi * cos_last / t_max)) / (1 + math.cos(math.pi * (cos_last - 1) / t_max))
                         * (group - eta_min) + eta_min)
    return out


def test_schedule_equals_mmengines_linear_warmup_then_cosine():
    recipe = dataclasses.replace(RECIPES["mambapeft"], epochs=7, warmup_epochs=2)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
    sched, got, steps = WarmupCosine(opt, recipe, 3), [], 3
    for epoch in range(recipe.epochs):  # as fit drives it
        for step in range(steps):
            got.append(opt.param_groups[0]["lr"])
            sched.step_update(epoch * steps + step + 1)
        sched.step(epoch)
    want = mmengine_lrs(1e-3, 1e-3, 1e-5, 2, 7, 3)
    assert got == pytest.approx(want, rel=1e-9)
    assert got[0] == pytest.approx(1e-6) and got[5] == pytest.approx(1e-3)  # the warm-up's last iteration: lr
    assert got[6] == pytest.approx(1e-3)  # epoch 2, the cosine's first: still lr, then cos(pi k / 5)
    assert got[9] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 5)) / 2)


def test_run_with_mambapeft_recipe_schedules_per_step_clips_and_keeps_the_last_batch(data_root, tmp_path,
                                                                                     monkeypatch):
    """Every optimizer step of a real run: its lr is mmengine's, its gradients' norm (a naive sum of
    squares) is min(the unclipped norm, clip_grad)."""
    clip, steps = 0.05, []
    clip_norm, adamw_step = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step

    def clipping(params, max_norm, *a, **k):
        params = list(params)
        steps.append({"before": math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))})
        return clip_norm(params, max_norm, *a, **k)

    def stepping(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        steps[-1].update(lr=self.param_groups[0]["lr"], after=math.sqrt(sum(float(g.double().pow(2).sum())
                                                                             for g in grads)))
        return adamw_step(self, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clipping)
    monkeypatch.setattr(torch.optim.AdamW, "step", stepping)
    recipe = {"recipe": "mambapeft", "image_size": 32, "batch_size": 300, "epochs": 4, "warmup_epochs": 2,
              "eval_every": 2, "clip_grad": clip, "lr": 3e-3, "warmup_lr_init": 3e-6}
    spec = RunSpec("vit-tiny", "digits", "linear", {}, 0, "test", recipe)
    record = read_record(execute(spec, tmp_path, data_root, progress=False))
    n = record["split_sizes"]["train800val200"]
    per_epoch = -(-n // 300)  # drop_last False: the incomplete batch trains too
    assert n % 300 and len(steps) == 4 * per_epoch
    assert [s["lr"] for s in steps] == pytest.approx(mmengine_lrs(3e-3, 1e-3, 1e-5, 2, 4, per_epoch), rel=1e-9)
    assert record["lrs"] == pytest.approx([s["lr"] for s in steps[::per_epoch]], rel=1e-12)
    assert all(s["after"] == pytest.approx(min(s["before"], clip), rel=1e-4) for s in steps)
    assert sum(s["before"] > clip for s in steps) >= len(steps) // 2  # it did clip


def test_param_groups_leave_the_no_decay_names_and_flat_tensors_undecayed():
    model = build_model("vim-tiny-test", "fft", 5, pretrained=False, backbone_options={"img_size": 32})
    recipe = recipe_for("vim-tiny-test", recipe="mambapeft")
    exempt, decay = param_groups(model, recipe.weight_decay, recipe.no_decay_1d, recipe.no_decay)
    assert (exempt["weight_decay"], decay["weight_decay"]) == (0.0, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in exempt["params"]}
    want = {n for n, p in model.named_parameters()
            if p.ndim <= 1 or n.endswith(".bias") or n.rsplit(".", 1)[-1] in recipe.no_decay}
    assert undecayed == want and len(undecayed) + len(decay["params"]) == len(names)
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.0.mixer.A_b_log"} <= undecayed  # 2-d / 3-d
    assert "layers.0.mixer.in_proj.weight" not in undecayed
    # the no-decay names alone (without no_decay_1d): only those
    only, rest = param_groups(model, 1e-4, False, ("A_log",))
    assert {names[id(p)] for p in only["params"]} == {n for n in names.values() if n.endswith(".A_log")}
    assert len(rest["params"]) == len(names) - len(only["params"])


# --- the epoch rule and the mambapeft table -----------------------------------------------------------------------

def _record(runs, backbone, method, task, config, accs, eval_split="test", recipe=None, seed=42):
    """A done record with evaluations {epoch: acc} (best / final derived from them, as fit's summary)."""
    train_split = "train800val200" if eval_split == "test" else "train800"
    identity = {"backbone": backbone, "task": task, "method": method, "seed": seed, "method_config": config,
                "train_split": train_split, "eval_split": eval_split, "recipe": recipe_identity(backbone, recipe or {}),
                "provenance": {"weights": {"source": "hub", "sha256": "a" * 64}, "precision": "fp32",
                               "data": {"lists_sha256": hashlib.sha256(f"{task}{eval_split}".encode()).hexdigest()}}}
    run_id = f"s{seed}-{digest(identity)[:10]}"
    best = max(accs, key=lambda e: accs[e])
    write_json(runs / backbone / method / task / f"{run_id}.json", {
        "run_id": run_id, **identity, "status": "done", "params": 1000, "storage_bytes": 4000,
        "evaluations": [{"epoch": e, "acc": a, "loss": 1.0} for e, a in accs.items()], "best_acc": accs[best],
        "best_epoch": best, "final_acc": accs[max(accs)], "wall_time_s": 1.0, "images_per_s": 1.0})


def test_epoch_rule_best_or_final_from_one_set_of_records(tmp_path):
    # two configurations: r=1 peaks early (80 at epoch 10, final 60), r=2 ends higher (70 final, best 72)
    _record(tmp_path, "vit-b", "lora", "dtd", {"r": 1}, {10: 80.0, 20: 60.0})
    _record(tmp_path, "vit-b", "lora", "dtd", {"r": 2}, {10: 72.0, 20: 70.0})
    records = tables.load_records(tmp_path)
    row = tables.Row("vit-b", "lora", "lora")
    best, _ = tables.cell_results(records, "runs", dataclasses.replace(row, recipe=records["recipe"][0]), "paper")
    final, _ = tables.cell_results(records, "runs", dataclasses.replace(row, recipe=records["recipe"][0]), "paper",
                                   "final")
    assert best["acc"].tolist() == [80.0] and final["acc"].tolist() == [70.0]  # each chooses its own config
    # vtab: the sweep's choice (best final val200: r=2), its retrain at the epoch where its val200 run peaked
    vtab = tmp_path / "vtab"
    _record(vtab, "vit-b", "lora", "dtd", {"r": 1}, {10: 50.0, 20: 55.0}, "val200")
    _record(vtab, "vit-b", "lora", "dtd", {"r": 2}, {10: 66.0, 20: 60.0}, "val200")
    _record(vtab, "vit-b", "lora", "dtd", {"r": 2}, {10: 75.0, 20: 71.0})
    records = tables.load_records(vtab)
    row = dataclasses.replace(row, recipe=records["recipe"][0])
    assert tables.cell_results(records, "runs", row, "vtab")[0]["acc"].tolist() == [71.0]  # final
    assert tables.cell_results(records, "runs", row, "vtab", "best")[0]["acc"].tolist() == [75.0]  # epoch 10


@pytest.mark.slow
def test_mambapeft_table_sets_our_rows_beside_their_published_means(tmp_path, capsys):
    paper = tables.read_paper()
    assert paper.loc[("mambapeft", "vim-s", "lora-in_proj"), "params_k"] == 1483
    fixed = next(f for _, m, f, _ in PRESETS["mambapeft"] if m == "lora" and f["targets"] == ("in_proj",))
    options = {k: v for k, v in fixed.items() if k != "recipe"}
    accs = {t: 50.0 + i for i, t in enumerate(tables.VTAB_TASKS)}
    for task, acc in accs.items():  # final 10 points below the best
        _record(tmp_path, "vim-s", "lora", task, {**options, "targets": list(options["targets"])},
                {50: acc, 100: acc - 10}, recipe=MAMBAPEFT)
    assert tables.main(["--table", "mambapeft", "--epoch", "final", "--runs", str(tmp_path), "--out",
                        str(tmp_path / "out")]) == 0
    capsys.readouterr()
    md = (tmp_path / "out" / "tablemambapeft_paper_final.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| vim-s lora-in_proj |")).strip("| ").split(" | ")
    header = next(x for x in md.splitlines() if x.startswith("| row |")).strip("| ").split(" | ")
    cell = dict(zip(header, line))
    groups = [sum(accs[t] - 10 for t in tables.VTAB_TASKS if tables.TASKS[t].group == g) /
              sum(tables.TASKS[t].group == g for t in tables.VTAB_TASKS) for g in tables.GROUPS]
    assert cell["cifar100"] == "40.0" and cell["Natural"] == f"{groups[0]:.1f}"
    assert cell["Mean"] == f"{sum(groups) / 3:.1f}" and cell["Mean19"] == f"{sum(accs.values()) / 19 - 10:.1f}"
    assert cell["paper Mean"] == f"{(76.58 + 84.08 + 60.16) / 3:.1f}" and cell["paper Mean19"] == "71.2"
    assert cell["diff19"] == f"{sum(accs.values()) / 19 - 10 - 71.25:+.1f}"
    assert "Cells: per seed, the test accuracy after the last epoch" in md
    result = tables.paper_result("mambapeft", paper)["mean"]
    assert result.loc["vim-s lora-in_proj", "Mean"] == pytest.approx(73.6067, abs=1e-3)
    assert tables.check_paper(paper).loc[("mambapeft", "vim-s", "fft"), "flag"]  # their Full row: 50.82, not 47.08


MAMBAPEFT = {"recipe": "mambapeft"}


def test_presets_name_their_methods_sizes_and_recipe():
    rows = {preset_label(m, f): (m, f) for _, m, f, _ in PRESETS["mambapeft"]}
    assert all(f["recipe"] == "mambapeft" for _, f in rows.values()) and len(rows) == len(PRESETS["mambapeft"])
    assert rows["lora-out_proj"][1]["r"] == 96 and rows["lora-x_proj"][1]["targets"] == ("x_proj", "x_proj_b")
    assert rows["lora-x_proj"][1]["dropout"] == rows["lora-dt_proj"][1]["dropout"] == 0.0  # merged weights
    assert rows["partial-dt_bias"][1]["wd_mult"] == 100 and rows["partial-A"][1]["wd_mult"] == 10
    assert rows["lorap-x-dora"][1] == {"targets": ("x",), "r": 64, "s": 0.1, "dora": True, "recipe": "mambapeft"}
    published = {k[2] for k in tables.read_paper().index if k[0] == "mambapeft"}
    assert set(rows) - published == {"lorap-x-dora"}  # their table has no DoRA row
    vim = PRESETS["vim"]
    assert all("recipe" not in f for _, _, f, _ in vim) and {m for _, m, _, _ in vim} >= {"lily", "bitfit", "addscan"}
    assert len({r.label for r in tables.TABLES["vim"]}) == len(vim)


def test_sweep_presets_list_their_rows_with_the_named_recipe(tmp_path, capsys):
    from vtab_lily import sweep
    base = ["--tasks", "digits", "--runs", str(tmp_path / "runs"), "--data-root", str(tmp_path / "nodata"),
            "--dry-run"]
    sweep.main(["--preset", "mambapeft", "--methods", "lora", *base])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [["vim-s", "lora"]] * 5 and lines[-1].startswith("5 runs:")
    specs = [p.spec for p in sweep.expand(PRESETS["mambapeft"], ["digits"], [42], {}, {}) if p.spec is not None]
    lora = [s for s in specs if s.method == "lora"]
    assert [s.options["r"] for s in lora] == [32, 64, 64, 96, 32]
    assert lora[1].options["targets"] == ("x_proj", "x_proj_b")
    assert all(s.recipe == {"recipe": "mambapeft"} and s.full_recipe().clip_grad == 5.0 for s in specs)
    assert sweep.main(["--preset", "vim", "--methods", "lily", "--set", "recipe=mambapeft", *base]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("2 runs: 0 done, 2 to run, 0 failed")
    with pytest.raises(SystemExit):
        run_cli.main(["--help"])
    assert "recipe=mambapeft" in capsys.readouterr().out


@pytest.mark.slow
def test_interrupted_mambapeft_run_resumes_mid_warmup_to_the_same_record(data_root, tmp_path):
    from vtab_lily.train import Interrupted
    recipe = {"recipe": "mambapeft", "image_size": 32, "batch_size": 300, "epochs": 3, "warmup_epochs": 2,
              "eval_every": 1, "lr": 3e-3, "warmup_lr_init": 3e-6, "checkpoint_every": 100}
    spec = RunSpec("vit-tiny", "digits", "lora", {"r": 2}, 1, "test", recipe)
    whole = read_record(execute(spec, tmp_path / "a", data_root, progress=False))
    with pytest.raises(Interrupted):
        execute(spec, tmp_path / "b", data_root, interrupt_after=1, progress=False)  # inside the warm-up
    resumed = read_record(execute(spec, tmp_path / "b", data_root, progress=False))
    for key in ("evaluations", "lrs", "train_losses"):
        assert resumed[key] == whole[key], key


@pytest.mark.slow
def test_vim_table_takes_the_recipe_its_sweep_named(tmp_path, capsys):
    for task in ("dtd", "svhn"):
        _record(tmp_path, "vim-s", "lily", task, {"preset": "lily-s"}, {100: 60.0}, recipe=MAMBAPEFT)
    assert tables.main(["--table", "vim", "--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "vim-s lily [recipe: " in capsys.readouterr().out  # not in any row of the hustvl recipe's table
    assert tables.main(["--table", "vim", "--recipe", "mambapeft", "--runs", str(tmp_path), "--out",
                        str(tmp_path / "out")]) == 0
    assert "not in any row" not in capsys.readouterr().out
    md = (tmp_path / "out" / "tablevim_paper_mambapeft.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| vim-s lily-s |")).strip("| ").split(" | ")
    header = next(x for x in md.splitlines() if x.startswith("| row |")).strip("| ").split(" | ")
    assert dict(zip(header, row))["dtd"] == "60.0" and dict(zip(header, row))["svhn"] == "60.0"
