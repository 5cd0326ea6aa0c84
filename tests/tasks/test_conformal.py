"""Conformal prediction sets: the coverage guarantee on synthetic scores, set sizes, edge cases,
and the run's record through training, predict.py and scripts/conformal.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlite.deploy.commands import main_predict
from medlite.deploy.predict import Predictor
from medlite.deploy.run_dir import TrainedRun
from medlite.errors import ConfigError
from medlite.pipeline import run
from medlite.tasks import conformal as cp
from medlite.tasks.types import MULTILABEL
from tests.helpers import make_cfg

ROOT = Path(__file__).resolve().parents[2]
N_CAL = N_TEST = 1000
TRIALS = 200


def _draw(rng, n: int, k: int, concentration: float) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet probabilities and labels sampled from them (a calibrated model)."""
    probs = rng.dirichlet([concentration] * k, size=n)
    labels = np.minimum((probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1), k - 1)
    return probs, labels


def _trials(
    coverage: float, concentration: float, lam: float = 0.0, method: str = "aps", k: int = 5
):
    """Mean test coverage and set size over fresh calibration + test draws."""
    rng = np.random.default_rng(0)
    found = []
    for _ in range(TRIALS):
        cal_p, cal_y = _draw(rng, N_CAL, k, concentration)
        test_p, test_y = _draw(rng, N_TEST, k, concentration)
        q = cp.threshold(cp.true_class_scores(cal_p, cal_y, lam=lam, method=method), coverage)
        member = cp.prediction_sets(test_p, q, lam=lam, method=method)
        found.append(cp.evaluate_sets(member, test_y))
    return (
        float(np.mean([f["coverage"] for f in found])),
        float(np.std([f["coverage"] for f in found])),
        float(np.mean([f["mean_set_size"] for f in found])),
    )


@pytest.mark.parametrize("coverage", [0.9, 0.95])
def test_coverage_is_the_target_within_sampling_error(coverage):
    mean, spread, _ = _trials(coverage, concentration=1.0)
    error = 3 * spread / np.sqrt(TRIALS)
    # split conformal: E[coverage] is in [1 - alpha, 1 - alpha + 1/(n + 1)] for continuous scores
    assert coverage - error <= mean <= coverage + 1 / (N_CAL + 1) + error


def test_sets_shrink_as_the_model_gets_sharper():
    _, _, flat = _trials(0.9, concentration=1.0)
    _, _, sharp = _trials(0.9, concentration=0.2)
    assert sharp < flat - 0.5


def test_raps_keeps_coverage_with_smaller_sets():
    aps_cov, spread, aps_size = _trials(0.9, concentration=1.0)
    raps_cov, _, raps_size = _trials(0.9, concentration=1.0, lam=0.2)
    assert raps_cov >= 0.9 - 3 * spread / np.sqrt(TRIALS)
    assert raps_size < aps_size


@pytest.mark.parametrize("coverage", [0.9, 0.95])
def test_lac_covers_and_keeps_binary_sets_small(coverage):
    # two classes, a weak model (~25% wrong): APS's sets are both classes, LAC's are not
    aps_cov, spread, aps_size = _trials(coverage, concentration=1.0, k=2)
    lac_cov, spread, lac_size = _trials(coverage, concentration=1.0, method="lac", k=2)
    error = 3 * spread / np.sqrt(TRIALS)
    assert coverage - error <= lac_cov <= coverage + 1 / (N_CAL + 1) + error
    assert aps_size == 2.0 and aps_cov == 1.0
    assert lac_size < 2.0


def test_scores_by_hand():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    np.testing.assert_allclose(cp.true_class_scores(probs, [1, 2]), [0.8, 0.9])
    np.testing.assert_allclose(cp.true_class_scores(probs, [1, 2], method="lac"), [0.7, 0.7])
    # q = 0.8: row 0 holds classes 0 (0.5) and 1 (0.8); row 1 holds only its top class (0.6)
    member = cp.prediction_sets(probs, 0.8)
    assert cp.set_names(member, ("a", "b", "c")) == [["a", "b"], ["b"]]
    # a threshold below every score still keeps the top class (no empty sets)
    assert cp.prediction_sets(probs, 0.0).sum(axis=1).tolist() == [1, 1]


def test_threshold_is_the_finite_sample_quantile():
    scores = np.arange(1, 20) / 20  # n = 19
    assert cp.threshold(scores, 0.9) == pytest.approx(0.9)  # ceil(20 * 0.9) = 18th smallest
    assert cp.threshold(scores, 0.5) == pytest.approx(0.5)  # ceil(20 * 0.5) = 10th


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "much"])
def test_coverage_outside_zero_one_is_refused(bad):
    with pytest.raises(ConfigError, match="coverage"):
        cp.check_coverage(bad)


def test_tiny_calibration_sets_give_every_class():
    probs = np.full((5, 3), 1 / 3)
    scores = cp.true_class_scores(probs, [0, 1, 2, 0, 1])
    assert cp.threshold(scores, 0.9) == np.inf  # ceil(6 * 0.9) = 6 > 5 scores
    assert cp.prediction_sets(probs, cp.threshold(scores, 0.9)).all()
    record = cp.calibrate(probs, [0, 1, 2, 0, 1], probs, [0, 1, 2, 0, 1])
    assert record["0.9"]["threshold"] is None
    assert record["0.9"]["test_coverage"] == 1.0 and record["0.9"]["mean_set_size"] == 3.0
    with pytest.raises(ConfigError, match="at least one"):
        cp.threshold([], 0.9)


def test_multilabel_and_segmentation_are_refused():
    with pytest.raises(ConfigError, match="multi-label"):
        cp.check_task(MULTILABEL)
    with pytest.raises(ConfigError, match="classification"):
        cp.check_task("segmentation")


def test_stored_scores_give_any_coverage():
    rng = np.random.default_rng(1)
    probs, labels = _draw(rng, 300, 4, 1.0)
    record = json.loads(json.dumps(cp.calibrate(probs, labels)))  # as results.json keeps it
    for coverage in (0.8, 0.9, 0.97):
        q = cp.threshold(cp.true_class_scores(probs, labels), coverage)
        want = cp.set_names(cp.prediction_sets(probs, q), "abcd")
        assert cp.sets_from_record(record, probs, coverage, "abcd") == want


@pytest.mark.parametrize("flag", ["synthlesion_multiclass", "synthlesion_multilabel"])
def test_a_debug_run_records_the_conformal_block(tmp_path, flag):
    overrides = ["debug=limit", "callbacks=none", "profile.enabled=false", f"data.flag={flag}"]
    run(make_cfg(tmp_path, overrides))
    results = json.loads((tmp_path / "results.json").read_text())
    if results["task"]["type"] == MULTILABEL:  # no single true class: no sets
        assert cp.KEY not in results
        return
    block = results[cp.KEY]
    assert block["method"] == "aps" and block["calibrated_on"] == "val"
    assert len(block["val_scores"]) == block["n_calibration"] > 0
    # the probabilities predict.py reports: the run's temperature, when it has one
    assert block["temperature"] == (results.get("calibration") or {}).get("temperature")
    for coverage in ("0.9", "0.95"):
        entry = block[coverage]
        assert 0 <= entry["test_coverage"] <= 1
        assert 1 <= entry["mean_set_size"] <= len(results["task"]["labels"])


# ---------------------------------------------------------------------- predict.py, the script
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data: Path) -> Path:
    """A tiny BreastMNIST run (no export): predict.py's PyTorch runtime uses it."""
    out = tmp_path_factory.mktemp("conformal_run")
    overrides = [
        "data=breastmnist",
        f"paths.data_dir={shared_data}",
        f"paths.cache_dir={out / 'cache'}",
        "debug=limit",
        "callbacks=none",
        "profile.enabled=false",
    ]
    run(make_cfg(out, overrides))
    return out


@pytest.fixture
def image_folder(tmp_path: Path, shared_data: Path) -> Path:
    with np.load(shared_data / "breastmnist.npz") as f:
        images = f["test_images"][:4]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def test_predict_writes_the_set_column(trained_run, image_folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    args = [f"run={trained_run}", f"input={image_folder}", "coverage=0.95", f"out={out}"]
    assert main_predict(args + ["runtime=pytorch"]) == 0
    assert "set (0.95 coverage)" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    loaded = TrainedRun.load(trained_run)
    labels, record = loaded.task.labels, loaded.results[cp.KEY]
    assert len(rows) == 4
    for row in rows:
        chosen = row["set"].split("|")
        assert row["predicted"] in chosen and set(chosen) <= set(labels)
        # the set is the stored calibration applied to the probabilities predict.py reports
        probs = np.array([[float(row[f"p({lab})"]) for lab in labels]])
        assert cp.sets_from_record(record, probs, 0.95, labels)[0] == chosen


def test_predict_without_a_record_says_how_to_make_one(trained_run):
    loaded = TrainedRun.load(trained_run)
    old = TrainedRun(path=loaded.path, results={**loaded.results, cp.KEY: None})
    with pytest.raises(ConfigError, match="scripts/conformal.py"):
        Predictor(old, runtime="pytorch", coverage=0.95)
    with pytest.raises(ConfigError, match="coverage"):
        Predictor(loaded, runtime="pytorch", coverage=1.2)


def test_script_calibrates_an_old_run(trained_run, tmp_path, monkeypatch):
    copy = tmp_path / "old_run"
    shutil.copytree(trained_run, copy)
    results = json.loads((copy / "results.json").read_text())
    want = results.pop(cp.KEY)
    (copy / "results.json").write_text(json.dumps(results))
    spec = importlib.util.spec_from_file_location("conformal_script", ROOT / "scripts/conformal.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclass looks itself up there
    spec.loader.exec_module(script)
    assert script.main([f"run={copy}"]) == 0
    got = json.loads((copy / "results.json").read_text())[cp.KEY]
    assert got["val_scores"] == pytest.approx(want["val_scores"], abs=1e-5)


def test_auto_picks_lac_for_two_classes_and_aps_otherwise(trained_run):
    """Non-randomised APS gives both classes to every image of a weak binary model, so a
    two-class run (BreastMNIST here) calibrates LAC sets by default."""
    from medlite.tasks.types import BINARY, MULTICLASS

    assert cp.default_method(BINARY) == "lac" and cp.default_method(MULTICLASS) == "aps"
    block = json.loads((trained_run / "results.json").read_text())[cp.KEY]
    assert block["method"] == "lac"


def test_config_choices_are_the_methods_and_a_bad_one_fails_early(tmp_path):
    from medlite.config import CONFORMAL_CHOICES, validate

    assert set(cp.METHODS) <= set(CONFORMAL_CHOICES)
    with pytest.raises(ConfigError, match="eval.conformal"):
        validate(make_cfg(tmp_path, ["eval.conformal=magic"]))
