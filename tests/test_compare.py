"""Comparisons of table rows (vtab_lily/compare.py) against independent references on synthetic data: the
paired difference and its variance computed directly, a Monte Carlo bootstrap, scipy's t-test, exact sign and
Wilcoxon distributions by enumeration, a simulated null's coverage and p-values, Demsar's printed Friedman /
Nemenyi numbers; the plots; `tables --compare` end to end on records with predictions beside them."""
import dataclasses
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_tables import _record

from vtab_lily import compare, tables
from vtab_lily.predictions import Predictions, read_predictions, write_predictions
from vtab_lily.tasks import GROUPS, MINI_TASKS, TASKS

PAPER = tables.read_paper()


def test_paired_difference_and_its_variance_equal_the_direct_computation():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 400)) < np.array([[0.6], [0.7], [0.8]]), rng.random((3, 400)) < 0.6  # a seed effect
    x = 100.0 * (a.astype(float) - b)
    d, [(images, df_images), (seeds, df_seeds), (residual, df_residual)] = compare.difference_components(x)
    assert d == pytest.approx(100 * (a.mean() - b.mean()), rel=1e-12)
    per_image = [np.mean([x[s, i] for s in range(3)]) for i in range(400)]
    assert images == pytest.approx(np.var(per_image, ddof=1) / 400, rel=1e-12) and df_images == 399
    per_seed = [100 * (a[s].mean() - b[s].mean()) for s in range(3)]
    assert seeds == pytest.approx(np.var(per_seed, ddof=1) / 3, rel=1e-12) and df_seeds == 2
    interaction = sum((x[s, i] - per_seed[s] - per_image[i] + d) ** 2 for s in range(3) for i in range(400))
    assert residual == pytest.approx(-interaction / (2 * 399) / 1200, rel=1e-9) and df_residual == 2 * 399
    # the images' part is the paired bootstrap's variance (images resampled jointly over seeds), in closed form
    idx = rng.integers(0, 400, size=(20000, 400))
    boot = x.mean(axis=0)[idx].mean(axis=1)
    assert boot.var() == pytest.approx(images * 399 / 400, rel=0.03)  # MC error of a variance: sqrt(2/20000)
    var = images + seeds + residual
    se, df, low, high, p = compare.t_interval(d, [(images, 399), (seeds, 2), (residual, 798)])
    want_df = var ** 2 / (images ** 2 / 399 + seeds ** 2 / 2 + residual ** 2 / 798)
    assert se == pytest.approx(math.sqrt(var)) and df == pytest.approx(want_df)
    assert high - d == pytest.approx(stats.t.ppf(0.975, want_df) * se) and low == pytest.approx(2 * d - high)
    assert p == pytest.approx(2 * stats.t.sf(abs(d) / se, want_df))
    # a seed spread below what the residuals explain adds nothing
    flat = compare.difference_components(np.stack([x[0], x[0][::-1], x[0]]))[1]
    assert flat[1][0] == 0 and flat[2][0] == 0


def test_one_seed_is_scipys_paired_t_test_and_zero_variance_is_exact():
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.8, rng.random(300) < 0.75
    d, components = compare.difference_components(100.0 * (a[None].astype(float) - b[None]))
    se, df, low, high, p = compare.t_interval(d, components)
    ref = stats.ttest_rel(100.0 * a, 100.0 * b)
    assert p == pytest.approx(ref.pvalue, rel=1e-9) and df == pytest.approx(299)
    ci = ref.confidence_interval(0.95)
    assert (low, high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    same = compare.t_interval(*compare.difference_components(np.zeros((3, 50))))
    assert same[2:] == (0.0, 0.0, 1.0)  # identical predictions: the difference 0, exactly


def _exact_wilcoxon(d):
    """Two-sided exact p of the signed-rank statistic, by enumerating all 2^n sign patterns."""
    ranks = stats.rankdata(np.abs(d))
    w = ranks[d > 0].sum()
    null = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))])
    return min(1.0, 2 * min((null <= w).mean(), (null >= w).mean()))


def test_across_tasks_tests_equal_exact_enumerations_and_scipy():
    d = np.array([1.3, -0.4, 2.1, 0.7, 3.3, -1.9, 0.2, 1.1, np.nan])  # a task without a difference: dropped
    got = compare.across_tasks(d)
    assert (got["tasks"], got["positive"], got["negative"]) == (8, 6, 2)
    sign = min(1.0, 2 * sum(math.comb(8, k) for k in range(0, 3)) / 2 ** 8)  # P(<= 2 of 8 negative), two-sided
    assert got["sign_p"] == pytest.approx(sign) and got["sign_p"] == pytest.approx(stats.binomtest(6, 8).pvalue)
    assert got["wilcoxon_p"] == pytest.approx(_exact_wilcoxon(d[:8]))
    assert got["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d[:8]).pvalue)


@pytest.mark.parametrize("seeds, image_sd, seed_sd, low, high", [
    (1, 1.0, 0.0, 0.935, 0.965),  # one seed: the paired t-test
    (3, 1.0, 1.0, 0.935, 0.965),  # 3 seeds with a strong seed effect: the seeds' df of 2 carry the interval
    (3, 0.0, 0.0, 0.955, 0.985),  # no seed effect and no per-image preference: conservative (docs/comparisons.md)
])
def test_two_identical_methods_cover_zero_near_95_percent(seeds, image_sd, seed_sd, low, high):
    """4000 simulated comparisons of two methods with the same chances (300 new test images each with a
    difficulty, a per-image preference of each method and a per-seed shift of its logits): the truth is 0."""
    rng = np.random.default_rng(2)
    m, n = 4000, 300
    logit = rng.normal(1.0, 1.5, size=(m, 1, n))  # the images' difficulty, shared by both methods and seeds
    a, b = (rng.random((m, seeds, n)) < 1 / (1 + np.exp(-(logit + rng.normal(0, image_sd, (m, 1, n))
                                                          + rng.normal(0, seed_sd, (m, seeds, 1)))))
            for _ in range(2))
    d, components = compare.difference_components(100.0 * (a.astype(float) - b))
    _, _, lo, hi, p = compare.t_interval(d, components)
    coverage = ((lo <= 0) & (0 <= hi)).mean()
    assert low <= coverage <= high
    assert abs((p < 0.05).mean() - (1 - coverage)) < 1e-9  # p < 0.05 exactly when the interval excludes 0
    if high < 0.97:  # the p-values of the nominal cases: uniform
        assert np.allclose(np.histogram(p, bins=5, range=(0, 1))[0] / m, 0.2, atol=0.025)


DEMSAR_Q05 = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]  # Demsar 2006, Table 5(a), k = 2..10


def test_nemenyi_and_friedman_equal_demsars_tables_and_a_hand_computation():
    for k, q in zip(range(2, 11), DEMSAR_Q05):
        assert compare.nemenyi_cd(k, 6) / math.sqrt(k * (k + 1) / 36) == pytest.approx(q, abs=1.5e-3)
    # Demsar's worked example (§3.2.2: four C4.5 variants on 14 data sets, average ranks as printed)
    ranks, n, k = np.array([3.143, 2.000, 2.893, 1.964]), 14, 4
    chi2 = 12 * n / (k * (k + 1)) * ((ranks ** 2).sum() - k * (k + 1) ** 2 / 4)
    assert chi2 == pytest.approx(9.28, abs=0.01)
    assert compare.iman_davenport(chi2, n, k)[0] == pytest.approx(3.69, abs=0.01)
    assert compare.nemenyi_cd(4, 14) == pytest.approx(1.25, abs=0.005)
    # a small table: 3 rows on 5 tasks, no ties; rank 1 = best
    acc = pd.DataFrame({"A": [80, 70, 60, 90, 50], "B": [75, 72, 55, 85, 45], "C": [70, 60, 58, 80, 40]},
                       index=list(MINI_TASKS[:5]), dtype=float)
    hand = pd.DataFrame({"A": [1, 2, 1, 1, 1], "B": [2, 1, 3, 2, 2], "C": [3, 3, 2, 3, 3]}, index=acc.index)
    rk = compare.rank_rows({"mean": acc.T, "tasks": list(acc.index)}, ["A", "B", "C"])
    assert (rk.ranks == hand).all().all() and list(rk.average.index) == ["A", "B", "C"]
    r = hand.mean().to_numpy()
    chi2 = 12 * 5 / (3 * 4) * ((r ** 2).sum() - 3 * 16 / 4)
    assert rk.chi2 == pytest.approx(chi2) and rk.p == pytest.approx(math.exp(-chi2 / 2))  # chi2(2) survival
    assert rk.cd == pytest.approx(2.343 * math.sqrt(3 * 4 / 30), abs=1e-3)
    assert compare.cliques(pd.Series([1.2, 2.0, 2.9, 3.9]), 1.0) == [(0, 1), (1, 2)]  # 3.9 - 2.9 is not < 1
    assert compare.cliques(pd.Series([1.0, 1.5, 1.8, 3.5]), 1.0) == [(0, 2)]  # (1, 2) lies inside
    assert compare.cliques(pd.Series([1.0, 3.0, 5.0]), 1.0) == []


def _not_blank(path):
    import matplotlib.image
    pixels = matplotlib.image.imread(path)[..., :3]
    return pixels.std() > 0.05 and pixels.shape[0] > 100


MINI_ACC = {"lily": 0.80, "lora": 0.72, "fft": 0.78}  # each image's chance of being right, per method


def _mini_records(runs, methods=("lily", "lora"), seeds=(1, 2, 3), predictions=True):
    """vit-mini records of the mini table's rows on every mini task with predictions beside them: 400 test
    images per task, methods right with the chances of MINI_ACC (less 2 points per task) on average over the
    images; returns {(method, task, seed): correct}."""
    options = {r.method: dict(r.filters) for r in tables.TABLES["mini"] if r.backbone == "vit-mini"}
    rng = np.random.default_rng(3)
    truth = {}
    for t, task in enumerate(MINI_TASKS):
        labels = rng.integers(0, 5, 400)
        # per image a chance near 0 or 1 (a method gets most images right or wrong in every seed), mean MINI_ACC
        mean = {m: MINI_ACC[m] - 0.02 * t for m in methods}
        chance = {m: rng.beta(0.6 * mean[m], 0.6 * (1 - mean[m]), 400) for m in methods}
        for method in methods:
            for seed in seeds:
                correct = rng.random(400) < chance[method]
                preds = np.where(correct, labels, (labels + 1) % 5)
                path = _record(runs, "vit-mini", method, task, seed, 100 * correct.mean(), options[method],
                               recipe=None)
                if predictions:
                    write_predictions(path, Predictions(labels, np.array([10]), preds[None], f"sha-{task}"))
                truth[method, task, seed] = correct
    return truth


@pytest.mark.slow
def test_tables_compare_end_to_end_writes_the_paired_numbers(tmp_path, capsys):
    truth = _mini_records(tmp_path / "runs")
    out = tmp_path / "out"
    assert tables.main(["--table", "mini", "--runs", str(tmp_path / "runs"), "--out", str(out),
                        "--compare", "lily", "lora"]) == 0
    stem = out / "tablemini_paper_compare_vit-mini-lily_vs_vit-mini-lora"
    got = pd.read_csv(stem.with_suffix(".csv")).set_index("task")
    for task in MINI_TASKS:
        x = np.stack([100.0 * (truth["lily", task, s].astype(float) - truth["lora", task, s]) for s in (1, 2, 3)])
        ms_seed = 400 * np.var(x.mean(axis=1), ddof=1)  # the two-way ANOVA's mean squares
        ms_image = 3 * np.var(x.mean(axis=0), ddof=1)
        ms_res = ((x - x.mean(axis=1, keepdims=True) - x.mean(axis=0) + x.mean()) ** 2).sum() / (2 * 399)
        parts = [(ms_image, 399), (ms_seed, 2), (-ms_res, 798)] if ms_seed >= ms_res else [(ms_image, 399)]
        var = sum(v for v, _ in parts) / 1200
        df = (var * 1200) ** 2 / sum(v ** 2 / k for v, k in parts)
        half = stats.t.ppf(0.975, df) * math.sqrt(var)
        assert got.loc[task, "diff"] == pytest.approx(x.mean(), rel=1e-9)
        assert (got.loc[task, "low"], got.loc[task, "high"]) == (pytest.approx(x.mean() - half, rel=1e-9),
                                                                 pytest.approx(x.mean() + half, rel=1e-9))
        assert got.loc[task, "seeds"] == 3 and got.loc[task, "images"] == 400
    result = tables.build_table("mini", tables.load_records(tmp_path / "runs"), "paper", PAPER)["mean"]
    mean = result.loc["vit-mini lily", "Mean"] - result.loc["vit-mini lora", "Mean"]
    assert got.loc["Mean", "diff"] == pytest.approx(mean, rel=1e-9)
    groups = [[t for t in MINI_TASKS if TASKS[t].group == g] for g in GROUPS]
    var = sum((got.loc[t, "se"] / (3 * len(ts))) ** 2 for ts in groups for t in ts)
    assert got.loc["Mean", "se"] == pytest.approx(math.sqrt(var), rel=1e-9) and got.loc["Mean", "low"] > 0
    text = capsys.readouterr().out
    wins = int((got.loc[list(MINI_TASKS), "note"] == "win").sum())
    assert wins >= 5 and f"win/tie/loss (A vs B, tasks with an interval): {wins}/{7 - wins}/0" in text
    assert f"sign test p = {stats.binomtest(7, 7).pvalue:.2g}" in text
    assert stem.with_suffix(".md").read_text() == text.split("wrote ")[0].rstrip("\n") + "\n"
    assert _not_blank(stem.with_suffix(".png"))


@pytest.mark.slow
def test_three_rows_rank_and_old_records_say_no_predictions(tmp_path, capsys):
    _mini_records(tmp_path / "runs", methods=("lily", "lora", "fft"), predictions=False)
    out = tmp_path / "out"
    args = ["--table", "mini", "--runs", str(tmp_path / "runs"), "--out", str(out), "--compare"]
    assert tables.main([*args, "lily", "vit-mini lora"]) == 0
    two = pd.read_csv(out / "tablemini_paper_compare_vit-mini-lily_vs_vit-mini-lora.csv").set_index("task")
    assert (two.loc[list(MINI_TASKS), "note"] == "no predictions").all() and two["low"].isna().all()
    assert two.loc["Mean", "note"] == "no predictions" and two.loc["Mean", "diff"] > 0
    capsys.readouterr()
    assert tables.main([*args, "fft", "lily", "lora"]) == 0
    text = capsys.readouterr().out
    ranks = pd.read_csv(out / "tablemini_paper_ranks_vit-mini-fft_vit-mini-lily_vit-mini-lora.csv", index_col="row")
    means = tables.build_table("mini", tables.load_records(tmp_path / "runs"), "paper", PAPER)["mean"]
    rows = ["vit-mini fft", "vit-mini lily", "vit-mini lora"]
    hand = means.loc[rows, list(MINI_TASKS)].rank(ascending=False).mean(axis=1)
    assert ranks["average_rank"].to_dict() == pytest.approx(hand.to_dict())
    chi2 = stats.friedmanchisquare(*means.loc[rows, list(MINI_TASKS)].to_numpy()).statistic
    assert f"Friedman chi2 = {chi2:.3f}" in text and f"CD = {compare.nemenyi_cd(3, 7):.3f}" in text
    assert _not_blank(out / "tablemini_paper_ranks_vit-mini-fft_vit-mini-lily_vit-mini-lora.png")


def test_a_task_pairs_the_seeds_both_rows_have(tmp_path):
    def cells(accs):  # cell_results' frame of one task: records without predictions
        return pd.DataFrame({"task": "dtd", "seed": list(accs), "acc": list(accs.values()), "epoch": 10,
                             "path": [str(tmp_path / f"{s}.json") for s in accs]})
    got = compare.paired_task(cells({1: 70.0, 2: 72.0, 3: 90.0}), cells({1: 60.0, 2: 66.0}), ("a", "b"), "dtd")
    assert (got["seeds"], got["A"], got["B"], got["diff"], got["note"]) == (2, 71.0, 63.0, 8.0, "no predictions")
    none = compare.paired_task(cells({3: 90.0}), cells({1: 60.0}), ("a", "b"), "dtd")
    assert none["seeds"] == 0 and np.isnan(none["diff"]) and none["note"] == "no common seed"


@pytest.mark.parametrize("case", ["unknown", "ambiguous", "all", "one", "images"])
def test_compare_mistakes_are_one_error_line(tmp_path, capsys, case):
    runs = tmp_path / "runs"
    _mini_records(runs, seeds=(1,))
    if case == "images":  # lora's first task evaluated on another split list
        path = next((runs / "vit-mini" / "lora" / MINI_TASKS[0]).glob("*.json"))
        write_predictions(path, dataclasses.replace(read_predictions(path), eval_sha256="other"))
    argv = {"unknown": ["--table", "mini", "--compare", "lily", "dora"],
            "ambiguous": ["--table", "mini", "--compare", "lora", "fft"],
            "all": ["--compare", "lily", "lora"], "one": ["--table", "mini", "--compare", "lily"],
            "images": ["--table", "mini", "--compare", "lily", "lora"]}[case]
    assert tables.main([*argv, "--runs", str(runs), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    want = {"unknown": "has no such row", "ambiguous": "name one as '<backbone> lora'", "all": "one --table",
            "one": "two rows or more", "images": "different test images"}[case]
    assert want in err
