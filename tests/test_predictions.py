"""Per-example test predictions beside every done record (issue 21, section 1): what they hold, that they agree
with the record, that a resumed run keeps those of every evaluation, that a failed run leaves none."""
import hashlib
import json

import numpy as np
import pytest

from vtab_lily import run as run_module
from vtab_lily.data import load_split, task_dir
from vtab_lily.predictions import predictions_path, read_predictions
from vtab_lily.records import RunSpec, load_records, read_record
from vtab_lily.run import execute
from vtab_lily.tasks import get_task
from vtab_lily.train import Interrupted, NonFiniteLoss

TINY = {"image_size": 32, "batch_size": 50, "epochs": 4, "eval_every": 2, "warmup_epochs": 2, "lr": 3e-3,
        "checkpoint_every": 100}


@pytest.mark.slow
def test_a_done_run_writes_predictions_that_agree_with_its_record(data_root, tmp_path):
    path = execute(RunSpec("vit-tiny", "digits", "lora", {"r": 2}, 3, "test", TINY), tmp_path, data_root,
                   progress=False)
    record, p = read_record(path), read_predictions(path)
    assert predictions_path(path).name == path.name.removesuffix(".json") + ".preds.npz"
    assert p.labels.tolist() == load_split(data_root, "digits", "test", 32, progress=False).labels.tolist()
    assert p.epochs.tolist() == [e["epoch"] for e in record["evaluations"]] == [2, 4]
    (row,) = load_records(tmp_path).itertuples()
    by_epoch = json.loads(row.acc_by_epoch)
    for epoch in p.epochs:  # the predictions' accuracy is the record's, to the rounding of a percentage
        assert 100 * p.correct(epoch).mean() == pytest.approx(by_epoch[str(epoch)], abs=1e-9)
    lst = task_dir(data_root, get_task("digits")) / "test.txt"
    assert p.eval_sha256 == hashlib.sha256(lst.read_bytes()).hexdigest()
    assert predictions_path(path).stat().st_size <= 2 * p.preds.size + 2048  # <= 2 bytes per image and evaluation


@pytest.mark.slow
def test_a_resumed_run_keeps_the_predictions_of_every_evaluation(data_root, tmp_path):
    spec = RunSpec("vit-tiny", "digits", "lily", {"r": 4}, 1, "test", TINY)
    whole = read_predictions(execute(spec, tmp_path / "a", data_root, progress=False))
    with pytest.raises(Interrupted):  # after epoch 3: the evaluation after epoch 2 lives in the saved state
        execute(spec, tmp_path / "b", data_root, interrupt_after=3, progress=False)
    assert not list(tmp_path.glob("b/*/*/*/*.preds.npz"))
    resumed = read_predictions(execute(spec, tmp_path / "b", data_root, progress=False))
    assert resumed.epochs.tolist() == whole.epochs.tolist() == [2, 4]
    assert np.array_equal(resumed.preds, whole.preds) and resumed.eval_sha256 == whole.eval_sha256


def test_a_failed_rerun_leaves_no_predictions(data_root, tmp_path, monkeypatch):
    spec = RunSpec("vit-tiny", "digits", "linear", {}, 0, "test", {**TINY, "epochs": 2})
    path = execute(spec, tmp_path, data_root, progress=False)
    assert predictions_path(path).is_file()

    def diverge(*args, **kwargs):
        raise NonFiniteLoss("the training loss became nan at epoch 1, step 1")
    monkeypatch.setattr(run_module, "fit", diverge)
    with pytest.raises(NonFiniteLoss):
        execute(spec, tmp_path, data_root, force=True, progress=False)
    assert read_record(path)["status"] == "failed" and not predictions_path(path).exists()
