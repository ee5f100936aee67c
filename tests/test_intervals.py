"""Intervals in every cell and the protocol card (issue 21, sections 2 and 4): the bootstrap against truth on
simulated test sets (coverage, width against N), the means' intervals against a direct computation, what
`--ci` prints, the CSV's bounds and metadata, the LaTeX comment, old records ("no CI"), the card's content."""
import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from test_tables import PAPER, _record

from vtab_lily import intervals, tables
from vtab_lily.predictions import Predictions, predictions_path, write_predictions
from vtab_lily.records import load_records, recipe_identity
from vtab_lily.tasks import GROUPS, MINI_TASKS, TASKS

SIMS = 400  # simulated test sets per coverage check: a coverage of 95% is measured to +- 1.1% (one s.e.)


def _coverage(correct: np.ndarray, truth: float, draws: int = 1000) -> float:
    """The share of the simulated cells ([sims, S, N] bool) whose 95% interval holds `truth` (percent)."""
    boot = pd.DataFrame({k: intervals.bootstrap(c, str(k), draws) for k, c in enumerate(correct)})
    lo, hi = intervals.bounds(boot)
    return float(((lo <= truth) & (truth <= hi)).mean())


def test_one_seed_interval_covers_a_binomial_accuracy_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for n, p in ((400, 0.75), (2000, 0.9)):
        correct = rng.random((SIMS, 1, n)) < p  # a test set of n images, each right with probability p
        assert 0.92 <= _coverage(correct, 100 * p) <= 0.98, (n, p)  # 95% +- 2.7 s.e. of 400 simulations


@pytest.mark.slow
def test_seeds_and_shared_images_crossed_coverage():
    """Truth: image i is right for seed s when mu + a_s + b_i + e_si > 0 (a: the seed's effect, b: the image's
    difficulty, shared by all seeds, e: their interaction); the target is the expected accuracy over seeds and
    images, Phi(mu / sqrt(1 + sa^2 + sb^2))."""
    rng = np.random.default_rng(1)

    def cells(seeds, n, mu, sa, sb):
        latent = (mu + rng.normal(0, sa, (SIMS, seeds, 1)) + rng.normal(0, sb, (SIMS, 1, n))
                  + rng.normal(size=(SIMS, seeds, n)))
        return latent > 0, 100 * norm.cdf(mu / np.sqrt(1 + sa ** 2 + sb ** 2))

    # the test images dominate (seeds' spread about 0.5 points): conservative (the interaction counts twice)
    assert _coverage(*cells(3, 400, 0.8, 0.02, 1.0)) >= 0.95
    # the seeds matter as much as the images (spread about 7 points, 8 seeds on 200 images): near 95%
    assert 0.92 <= _coverage(*cells(8, 200, 0.8, 0.25, 0.5)) <= 0.98


def test_interval_shrinks_as_one_over_root_n_and_matches_the_binomial_width():
    widths = {}
    for n in (100, 10_000):
        correct = (np.arange(n) < 0.7 * n)[None]  # 70% right
        lo, hi = intervals.bounds(pd.DataFrame({"x": intervals.bootstrap(correct, "t")}))
        widths[n] = hi["x"] - lo["x"]
        assert widths[n] == pytest.approx(2 * norm.ppf(0.975) * 100 * np.sqrt(0.21 / n), rel=0.1)
    assert widths[100] / widths[10_000] == pytest.approx(10, rel=0.15)


def test_same_records_same_intervals_and_seed_draws_depend_on_s_only():
    correct = np.random.default_rng(2).random((3, 500)) < 0.6
    assert np.array_equal(intervals.bootstrap(correct, "dtd"), intervals.bootstrap(correct, "dtd"))
    assert np.array_equal(intervals.seed_draws(3), intervals.seed_draws(3))
    one = intervals.bootstrap(correct[:1], "dtd")
    assert one.std() < intervals.bootstrap(correct, "dtd").std() * 3 and np.isfinite(one).all()


# --- tables from records with predictions ----------------------------------------------------------------------

SIZES = {t: 200 + 40 * i for i, t in enumerate(MINI_TASKS)}  # test images per mini task


def _runs(runs, seeds=(1, 2, 3), method="lily", config=None, with_predictions=True, accuracy=0.6):
    """Records of a mini table row, one per (task, seed), each with predictions at its best epoch (10) whose
    accuracy is the record's best_acc; returns {task: [S, N] bool} of the seeds in order."""
    rng = np.random.default_rng(abs(hash((method, seeds))) % 2**32)
    truth = {}
    for task, n in SIZES.items():
        labels = rng.integers(0, 10, n)
        right = rng.random((len(seeds), n)) < accuracy
        truth[task] = right
        for seed, r in zip(seeds, right):
            path = _record(runs, "vit-mini", method, task, seed, 100.0 * r.mean(), config or {"r": 8},
                           recipe=recipe_identity("vit-mini", {}))
            if with_predictions:
                preds = np.where(r, labels, (labels + 1) % 10)
                write_predictions(path, Predictions(labels, np.array([10]), preds[None], "ab" * 32))
    return truth


def _mini(runs):
    return tables.build_table("mini", load_records(runs), "paper", PAPER)


def test_cells_and_means_carry_the_bootstrap_of_their_predictions(tmp_path):
    truth = _runs(tmp_path)
    result = _mini(tmp_path)
    draws = pd.DataFrame({t: intervals.bootstrap(c, t) for t, c in truth.items()})
    got = result["draws"]["vit-mini lily"]
    for task in MINI_TASKS:
        assert np.array_equal(got[task], draws[task])
        assert result["lo"].loc["vit-mini lily", task] == pytest.approx(np.quantile(draws[task], 0.025), rel=1e-12)
    groups = pd.DataFrame({g: draws[[t for t in MINI_TASKS if TASKS[t].group == g]].mean(axis=1) for g in GROUPS})
    assert np.allclose(got["Mean"], groups.mean(axis=1), rtol=1e-12)  # per draw: the mean of the group means
    assert np.allclose(got[f"Mean{len(MINI_TASKS)}"], draws.mean(axis=1), rtol=1e-12)
    lo, hi = result["lo"].loc["vit-mini lily", "Mean"], result["hi"].loc["vit-mini lily", "Mean"]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(groups.mean(axis=1), [0.025, 0.975])), rel=1e-12)
    assert lo < result["mean"].loc["vit-mini lily", "Mean"] < hi
    assert np.isnan(result["lo"].loc["vit-mini lora", "Mean"])  # no records: no interval


def test_one_seed_mean_interval_matches_the_binomial_variance_of_a_mean_of_group_means(tmp_path):
    truth = _runs(tmp_path, seeds=(1,), accuracy=0.7)
    result = _mini(tmp_path)
    weights = {t: 1 / len(GROUPS) / sum(TASKS[u].group == TASKS[t].group for u in MINI_TASKS) for t in MINI_TASKS}
    var = sum((weights[t] * 100) ** 2 * c.mean() * (1 - c.mean()) / c.shape[1] for t, c in truth.items())
    assert result["draws"]["vit-mini lily"]["Mean"].std() == pytest.approx(np.sqrt(var), rel=0.08)


@pytest.mark.slow
def test_ci_choices_print_mean_std_or_interval_and_the_outputs_carry_bounds_and_card(tmp_path, capsys):
    _runs(tmp_path / "runs")
    result = _mini(tmp_path / "runs")
    task = MINI_TASKS[0]
    mean, std = result["mean"].loc["vit-mini lily", task], result["std"].loc["vit-mini lily", task]
    lo, hi = result["lo"].loc["vit-mini lily", task], result["hi"].loc["vit-mini lily", task]
    m_lo, m_hi = result["lo"].loc["vit-mini lily", "Mean"], result["hi"].loc["vit-mini lily", "Mean"]
    want = {"none": f"| {mean:.1f} |", "std": f"| {mean:.1f} ± {std:.1f} (n=3) |",
            "ci95": f"| {mean:.1f} [{lo:.1f}, {hi:.1f}] (n=3) |"}
    for ci, cell in want.items():
        out = tmp_path / ci
        assert tables.main(["--table", "mini", "--runs", str(tmp_path / "runs"), "--out", str(out), "--ci", ci]) == 0
        md = (out / "tablemini_paper.md").read_text()
        row = next(line for line in md.splitlines() if line.startswith("| vit-mini lily |"))
        assert cell in row.replace("| 0.001 | 4 ", ""), (ci, row)
        assert (f"{result['mean'].loc['vit-mini lily', 'Mean']:.1f} [{m_lo:.1f}, {m_hi:.1f}]" in row) == (ci == "ci95")
        assert md.startswith("Protocol card:\n- table: mini\n- protocol: paper\n")
        csv = pd.read_csv(out / "tablemini_paper.csv", index_col="row")  # bounds whatever --ci prints
        assert csv.loc["vit-mini lily", f"{task}_lo"] == pytest.approx(lo, rel=1e-12)
        assert csv.loc["vit-mini lily", "Mean_hi"] == pytest.approx(m_hi, rel=1e-12)
        assert np.isnan(csv.loc["vit-mini lora", f"{task}_lo"])
        meta = json.loads((out / "tablemini_paper.json").read_text())
        assert meta["protocol_card"] == json.loads(json.dumps(tables.protocol_card(result)))
        tex = (out / "tablemini_paper.tex").read_text()
        assert tex.startswith("% protocol card\n% table: mini\n")
        assert (rf"{mean:.1f} {{\scriptsize[{lo:.1f}, {hi:.1f}]}}" in tex) == (ci == "ci95")
    assert "Protocol card:" in capsys.readouterr().out  # printed above the table


def test_old_records_without_predictions_print_as_before_and_say_no_ci(tmp_path):
    _runs(tmp_path, with_predictions=False)
    result = _mini(tmp_path)
    assert result["lo"].isna().all().all() and tables.ci_shown(result, "ci95") == "std"
    md = tables.to_markdown(result, "mini", "paper")
    task = MINI_TASKS[0]
    mean, std = result["mean"].loc["vit-mini lily", task], result["std"].loc["vit-mini lily", task]
    assert f"| vit-mini lily | 0.001 | 4 | {mean:.1f} ± {std:.1f} (n=3) |" in md  # today's cell
    assert "- ci: no CI: the records have no per-example predictions" in md
    # beside a row with predictions, the old row's cells say so
    _runs(tmp_path, method="lora", config={"r": 8})
    md = tables.to_markdown(_mini(tmp_path), "mini", "paper")
    assert f"| vit-mini lily | 0.001 | 4 | {mean:.1f} ± {std:.1f} (n=3) no CI |" in md
    assert "[" in next(line for line in md.splitlines() if line.startswith("| vit-mini lora |"))


def test_predictions_that_disagree_with_their_record_give_no_ci(tmp_path, capsys):
    _runs(tmp_path, seeds=(1,))
    path = sorted(tmp_path.glob(f"vit-mini/lily/{MINI_TASKS[0]}/*.json"))[0]
    p = Predictions(np.zeros(SIZES[MINI_TASKS[0]], int), np.array([10]), np.zeros((1, SIZES[MINI_TASKS[0]]), int), "")
    write_predictions(path, p)  # all right: 100%, but the record says otherwise
    result = _mini(tmp_path)
    assert "give 100.0000% at epoch 10, its record" in capsys.readouterr().err
    assert np.isnan(result["lo"].loc["vit-mini lily", MINI_TASKS[0]])
    assert np.isnan(result["lo"].loc["vit-mini lily", "Mean"])
    assert not np.isnan(result["lo"].loc["vit-mini lily", MINI_TASKS[1]])
    assert predictions_path(path).exists()


def test_protocol_card_of_a_mini_table(tmp_path):
    _runs(tmp_path, seeds=(1, 2, 3))
    _runs(tmp_path, seeds=(4,), method="lora", config={"r": 8})
    card = tables.protocol_card(_mini(tmp_path))
    assert card == {
        "table": "mini", "protocol": "paper", "selection_split": "test", "epoch_rule": "best",
        "cells": tables.PROTOCOLS["paper", "best"],
        "aggregation": {**{g: "mean of the group's tasks" for g in GROUPS}, "Mean": "mean of the group means",
                        f"Mean{len(MINI_TASKS)}": "plain mean of the tasks"},
        "normalization": ["none (pixels in [0, 1])"], "image_size": [32], "epochs": [10], "recipes": ["vit-mini"],
        "seeds": [1, 2, 3, 4], "n_per_cell": {"min": 1, "max": 3}, "precision": ["fp32"],
        "weights_ids": {"vit-mini": ["a" * 12]},
        "data_ids": {t: [load_records(tmp_path).query("task == @t")["data_id"].iloc[0]] for t in sorted(MINI_TASKS)},
        "ci": intervals.ESTIMATOR}
    other = tables.protocol_card(tables.build_table("mini", load_records(tmp_path), "paper", PAPER, epoch="final"))
    best, final = tables.PROTOCOLS["paper", "best"], tables.PROTOCOLS["paper", "final"]
    assert tables.card_differences(card, other)[:2] == ["epoch_rule: best vs final", f"cells: {best} vs {final}"]
