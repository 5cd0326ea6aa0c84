"""medlite's Optuna sweeper: search-space parsing, how each job's outcome is told to Optuna, and
a real multi-objective search through ``train.py -m`` with a refused trial and a continuation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from medlite.errors import ConfigError
from medlite.results import lookup
from medlite.sweeps.optuna import (
    OPTIMIZED_VALUE,
    Objective,
    OptunaSweeper,
    distribution,
    parse_objectives,
    split_search_space,
)
from tests.helpers import CONF_DIR, subprocess_env

REPO = CONF_DIR.parent
od = optuna.distributions


def _dist(line: str):
    return distribution(OverridesParser.create().parse_override(line))


def test_search_expressions_map_to_optuna_distributions():
    assert _dist("a=interval(0.1, 0.9)") == od.FloatDistribution(0.1, 0.9)
    assert _dist("a=tag(log, interval(1e-4, 1e-2))") == od.FloatDistribution(1e-4, 1e-2, log=True)
    assert _dist("a=interval(2, 10)") == od.FloatDistribution(2.0, 10.0)  # Hydra: floats
    # range() as Python's: the stop is excluded
    assert _dist("a=range(8, 64, 8)") == od.IntDistribution(8, 56, step=8)
    assert _dist("a=choice(magnitude, l1, taylor)") == od.CategoricalDistribution(
        ["magnitude", "l1", "taylor"]
    )
    with pytest.raises(ConfigError, match="log interval must start above 0"):
        _dist("a=tag(log, interval(0, 1))")
    with pytest.raises(ConfigError, match="low < high"):
        _dist("a=interval(0.5, 0.1)")


def test_command_line_sweeps_join_the_search_and_fixed_values_win():
    params = {"optim.lr": "tag(log, interval(1e-4, 1e-2))", "compress.steps.0.ratio": "0.3"}
    space, fixed = split_search_space(params, ["model=choice(litecnn,vim)", "optim.lr=0.001"])
    assert set(space) == {"model"}  # optim.lr fixed by the command line, ratio fixed by params
    assert sorted(fixed) == ["compress.steps.0.ratio=0.3", "optim.lr=0.001"]
    with pytest.raises(ConfigError, match="nothing to search"):
        split_search_space({}, ["seed=1"])


def test_objectives_read_finite_numbers_from_results():
    results = {"val": {"auc": 0.81, "loss": float("nan")}, "efficiency": {"macs": 10_000_000}}
    assert Objective("val/auc").read(results) == 0.81
    assert Objective("efficiency/macs").read(results) == 1e7
    assert Objective("val/loss").read(results) is None  # NaN: not a result
    assert Objective("test/auc").read(results) is None
    with pytest.raises(ConfigError, match="direction"):
        parse_objectives([{"metric": "val/auc", "direction": "up"}])
    with pytest.raises(ConfigError, match="path in results.json"):
        parse_objectives([{"metric": "auc"}])


def test_the_default_objective_is_what_each_run_optimised():
    """null objectives: maximise ``optimized/value``, the value of the run's optimized_metric
    (its task's monitored metric by default), whatever that metric is called."""
    assert parse_objectives(None) == [Objective(OPTIMIZED_VALUE, "maximize")]
    results = {
        "val": {"dice": 0.7},
        "optimized": {"metric": "val/dice", "mode": "max", "value": 0.7},
    }
    (default,) = parse_objectives(None)
    assert default.read(results) == 0.7 and default.conflict(results) is None
    lower = {"optimized": {"metric": "val/hd95", "mode": "min", "value": 4.0}}
    assert "mode min" in default.conflict(lower) and "direction: minimize" in default.conflict(
        lower
    )
    assert Objective(OPTIMIZED_VALUE, "minimize").conflict(lower) is None
    assert Objective("val/hd95", "maximize").conflict(lower) is None  # an explicit path: as asked


def _job(tmp_path: Path, name: str, results: dict | None, status=JobStatus.COMPLETED) -> JobReturn:
    out = tmp_path / name
    out.mkdir()
    if results is not None:
        (out / "results.json").write_text(json.dumps(results))
    job = JobReturn(
        hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(out)}}}),
        status=status,
    )
    job.return_value = RuntimeError("job crashed") if status == JobStatus.FAILED else 0.5
    return job


def _optimized(value: float, mode: str = "max") -> dict:
    return {"metric": "val/score", "mode": mode, "value": value}


def test_failed_nan_and_missing_trials_are_told_as_failed(tmp_path):
    study = optuna.create_study(direction="maximize")
    objectives = parse_objectives(None)
    outcomes = {
        "ok": {"status": "ok", "optimized": _optimized(0.75)},
        "nan": {"status": "ok", "optimized": _optimized(float("nan"))},
        "refused": {"status": "failed", "error": "ConfigError: cannot prune\nmore"},
        "no_results": None,
        "minimised": {"status": "ok", "optimized": _optimized(0.1, "min")},
    }
    for name, results in outcomes.items():
        trial = study.ask({"x": od.FloatDistribution(0, 1)})
        OptunaSweeper._tell(study, trial, _job(tmp_path, name, results), objectives)
    trial = study.ask({"x": od.FloatDistribution(0, 1)})
    OptunaSweeper._tell(study, trial, _job(tmp_path, "crash", None, JobStatus.FAILED), objectives)

    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL", "FAIL", "FAIL"]
    assert study.best_value == 0.75
    errors = [t.user_attrs.get("error") for t in study.trials]
    assert f"no finite {OPTIMIZED_VALUE}" in errors[1]
    assert errors[2] == "ConfigError: cannot prune"
    # a maximising study can't take a value that is better when lower: failed, and says why
    assert "val/score" in errors[4] and "mode min" in errors[4]
    assert "job crashed" in errors[5]


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (CONF_DIR / "sweep").glob("optuna_*.yaml"))
)
def test_search_presets_compose_with_the_medlite_sweeper(preset):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"sweep={preset}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.medlite.OptunaSweeper"
    assert cfg.compress.name == preset.removeprefix("optuna_")
    space, _ = split_search_space(dict(cfg.hydra.sweeper.params), [])
    for key in space:  # every searched key exists in the composed config
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
    assert cfg.optimized_metric is None  # the task's monitored (validation) metric
    for objective in parse_objectives(cfg.hydra.sweeper.objectives):
        assert objective.metric.split("/")[0] in ("optimized", "efficiency"), "never tune on test"


def _pareto_front(points: dict[int, tuple[float, float]]) -> set[int]:
    """Trials not dominated (score up, MACs down), computed here independently of Optuna."""
    front = set()
    for i, (score, macs) in points.items():
        dominated = any(
            a >= score and m <= macs and (a > score or m < macs)
            for j, (a, m) in points.items()
            if j != i
        )
        if not dominated:
            front.add(i)
    return front


@pytest.fixture(scope="module")
def prune_search(tmp_path_factory):
    """sweep=optuna_prune, 4 random trials over model x ratio on the embedded data. The
    structured pruning of EfficientViT-M is refused by medlite, so its trials must fail alone."""
    root = tmp_path_factory.mktemp("optuna")
    sweep = root / "sweep"

    def search(n_trials: int) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable, "train.py", "-m", "sweep=optuna_prune",
            "model=choice(litecnn,efficientvit_m)",
            "compress.steps.0.importance=magnitude", "compress.steps.0.iterative_steps=1",
            "debug=limit", "callbacks=none",
            f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.sampler=random",
            "hydra.sweeper.seed=2",
            f"paths.log_dir={root / 'outputs'}", f"hydra.sweep.dir={sweep}",
        ]  # fmt: skip
        env = subprocess_env(root)
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    first = search(4)
    after_first = {
        "rows": _trials(sweep),
        "best": json.loads((sweep / "optuna_best.json").read_text()),
        "summary": json.loads((sweep / "sweep_summary.json").read_text()),
    }
    again = search(5)  # the same sweep dir: the study continues with one more trial
    return sweep, first, after_first, again


def _trials(sweep: Path) -> list[dict]:
    with open(sweep / "optuna_trials.csv") as f:
        return list(csv.DictReader(f))


def test_a_real_search_records_failures_and_finds_the_pareto_front(prune_search):
    sweep, first, after_first, _ = prune_search
    rows = after_first["rows"]
    assert first.returncode == 1, first.stderr[-3000:]  # failed trials: a failed sweep
    assert len(rows) == 4
    models = {}
    for row in rows:
        res = json.loads((Path(row["job_dir"]) / "results.json").read_text())
        models[int(row["trial"])] = res["model"]["name"]
        if res["model"]["name"] == "efficientvit_m":  # refused combination: failed, reason kept
            assert row["state"] == "FAIL" and row["error"], row
        else:
            assert row["state"] == "COMPLETE", row
            # the values Optuna proposed are the ones the job trained with
            step = res["config"]["compress"]["steps"][0]
            assert math.isclose(step["ratio"], float(row["compress.steps.0.ratio"]))
            # the default objective: the value of the task's monitored validation metric
            assert res["optimized"]["metric"] == res["task"]["monitor"]
            assert res["optimized"]["mode"] == "max"
            assert float(row[OPTIMIZED_VALUE]) == pytest.approx(res["optimized"]["value"])
            assert res["optimized"]["value"] == lookup(res, res["task"]["monitor"])
            assert float(row["efficiency/macs"]) == res["efficiency"]["macs"]
    assert set(models.values()) == {"litecnn", "efficientvit_m"}, "seed gives no failed trial"

    best = after_first["best"]
    done = {
        int(r["trial"]): (float(r[OPTIMIZED_VALUE]), float(r["efficiency/macs"]))
        for r in rows
        if r["state"] == "COMPLETE"
    }
    assert {b["trial"] for b in best["best"]} == _pareto_front(done)
    assert best["n_failed"] == sum(r["state"] == "FAIL" for r in rows)
    assert (sweep / "optuna_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = after_first["summary"]
    assert summary["n_failed"] == best["n_failed"] and summary["n_jobs"] == 4
    assert "Pareto front" in first.stdout


def test_the_same_sweep_dir_continues_the_study(prune_search):
    sweep, _, after_first, again = prune_search
    rows = after_first["rows"]
    assert again.returncode == 1, again.stderr[-3000:]  # its earlier trials failed
    after = _trials(sweep)
    assert len(after) == 5 and after[:4] == rows  # earlier trials kept, one new one
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert len(study.trials) == 5
    assert Path(after[4]["job_dir"]).name.startswith("4_")  # job numbers continue too


def test_proposals_that_do_not_compose_fail_alone_and_the_study_ends_cleanly(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "train.py", "-m", "sweep=optuna_kd", "model=choice(nosuchmodel)",
        "hydra.sweeper.n_trials=2", f"paths.log_dir={tmp_path / 'outputs'}",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = subprocess_env(tmp_path)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]  # every trial failed
    rows = _trials(sweep)
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"]
    assert all("does not compose" in r["error"] and "nosuchmodel" in r["error"] for r in rows)
    best = json.loads((sweep / "optuna_best.json").read_text())
    assert best["best"] == [] and best["n_failed"] == 2
    assert "no trial completed" in " ".join(done.stdout.split())
