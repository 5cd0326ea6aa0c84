"""Sweep aggregation on a real multirun: per-job records, mean ± std over seeds, tables, the
Pareto plot, budget selection, and the command line (scripts/aggregate.py). The metrics come from
the runs' task records: a hand-made task with other metrics (Dice, IoU) aggregates the same way."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medlite.errors import ConfigError
from medlite.sweeps.aggregate import (
    LATENCIES,
    collect,
    pareto_front,
    parse_constraint,
    plot_pareto,
    select,
    summarise,
    summarise_stages,
    sweep_metrics,
    valid_keys,
    write_tables,
)
from medlite.tasks import BINARY, MULTICLASS, ClassificationTask
from tests.helpers import subprocess_env

BINARY_TASK = ClassificationTask(BINARY, ("benign", "malignant")).record()
#: a task of another kind, named only here: what aggregation must handle without knowing it
DICE_TASK = {
    "kind": "segmentation",
    "type": "binary-segmentation",
    "labels": ["background", "lesion"],
    "metrics": ["dice", "iou", "hd95"],
    "titles": {"dice": "Dice", "iou": "IoU", "hd95": "HD95"},
    "headline": ["dice", "iou"],
    "monitor": "val/dice",
    "mode": "max",
}

REPO = Path(__file__).resolve().parents[2]
JOBS = [
    "0_litecnn_synthlesion_none_seed0",
    "1_litecnn_synthlesion_none_seed1",
    "2_mobilenetv3_synthlesion_none_seed0",
    "3_mobilenetv3_synthlesion_none_seed1",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real 2 models x 2 seeds multirun of train.py on the embedded synthetic data.
    One thread per job: on a busy 2-core machine two threads per job thrash (minutes, not s)."""
    root = tmp_path_factory.mktemp("aggsweep")
    env = subprocess_env(root)
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "model=litecnn,mobilenetv3",
        "seed=0,1",
        "debug=limit",
        "callbacks=none",
        f"paths.log_dir={root / 'outputs'}",
        f"hydra.sweep.dir={root / 'sweep'}",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "sweep"


def _raw(sweep: Path) -> dict[str, dict]:
    """The results.json files themselves, read without medlite."""
    return {job: json.loads((sweep / job / "results.json").read_text()) for job in JOBS}


def _copy(sweep: Path, dest: Path) -> Path:
    shutil.copytree(sweep, dest, ignore=shutil.ignore_patterns("*.ckpt", "wandb"))
    return dest


def _script(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/aggregate.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"COLUMNS": "200"},
    )


# --------------------------------------------------------------------------- real sweep


def test_collect_one_record_per_job(sweep: Path) -> None:
    records = collect(sweep)
    assert sorted(r["job"] for r in records) == JOBS
    raw = _raw(sweep)
    for rec in records:
        res = raw[rec["job"]]
        assert rec["status"] == "ok" and rec["error"] is None
        assert (rec["model"], rec["paradigm"], rec["compress"]) == (
            res["model"]["name"],
            "cnn",
            "none",
        )
        assert res["data"]["name"] == "synthlesion"  # grouped by the data name
        assert (rec["data"], rec["size"], rec["seed"]) == ("synthlesion", 28, res["seed"])
        assert rec["task"] == res["task"]
        for metric in res["task"]["metrics"]:  # one column per metric of the run's task
            assert rec[f"test_{metric}"] == res["test"][metric]
        assert rec["params"] == res["efficiency"]["params"] > 0
        assert rec["latency_ms"] == res["efficiency"]["latency_ms"] > 0
        assert Path(rec["run_dir"]) == sweep / rec["job"]
    # a parent of the sweep finds the same jobs (paths relative to it)
    assert len(collect(sweep.parent)) == 4


def test_summary_mean_and_sample_std_over_seeds(sweep: Path) -> None:
    summary = summarise(collect(sweep))
    assert [(g["model"], g["n"], g["n_failed"], g["seeds"]) for g in summary] == [
        ("litecnn", 2, 0, [0, 1]),
        ("mobilenetv3", 2, 0, [0, 1]),
    ]
    raw = _raw(sweep)
    task = next(iter(raw.values()))["task"]
    metrics = sweep_metrics(summary)
    assert metrics.names == tuple(task["metrics"]) and metrics.primary == task["headline"][0]
    for group in summary:
        runs = [r for r in raw.values() if r["model"]["name"] == group["model"]]
        for metric in task["metrics"]:
            values = np.array([r["test"][metric] for r in runs], dtype=float)
            assert group[f"test_{metric}"] == pytest.approx(values.mean())
            assert group[f"test_{metric}_std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        for cost in ("size_mb", "latency_ms"):
            values = np.array([r["efficiency"][cost] for r in runs], dtype=float)
            assert group[cost] == pytest.approx(values.mean())
        assert group["params"] == runs[0]["efficiency"]["params"]
        assert group["macs"] == runs[0]["efficiency"]["macs"]


def test_tables_have_one_row_per_job_and_per_group(sweep: Path, tmp_path: Path) -> None:
    records = collect(sweep)
    summary = summarise(records)
    paths = write_tables(summary, tmp_path / "out", records)
    assert set(paths) == {"aggregate.csv", "summary.csv", "summary.md"}
    with paths["aggregate.csv"].open() as f:
        jobs = list(csv.DictReader(f))
    assert sorted(j["job"] for j in jobs) == JOBS and {j["status"] for j in jobs} == {"ok"}
    with paths["summary.csv"].open() as f:
        groups = list(csv.DictReader(f))
    assert [(g["model"], g["n"], g["seeds"]) for g in groups] == [
        ("litecnn", "2", "0;1"),
        ("mobilenetv3", "2", "0;1"),
    ]
    assert float(groups[0]["test_auc"]) == pytest.approx(summary[0]["test_auc"])
    md = paths["summary.md"].read_text()
    assert "## cnn" in md and "| Pareto |" in md
    task = records[0]["task"]
    header = " | ".join(f"test {task['titles'][m]}" for m in task["metrics"])
    assert f"| failed | {header} | params |" in md  # columns titled by the task record
    for g in summary:
        cell = f"{g['test_auc']:.3f} ± {g['test_auc_std']:.3f}"
        assert any(
            line.startswith(f"| {g['model']} | none |") and cell in line for line in md.splitlines()
        )
    # litecnn is smaller than mobilenetv3, so it is on the AUC-vs-params front whatever the AUCs
    assert summary[0]["pareto_params"] or summary[0]["test_auc"] < summary[1]["test_auc"]


def test_pareto_plot_is_a_png(sweep: Path, tmp_path: Path) -> None:
    out = plot_pareto(summarise(collect(sweep)), tmp_path / "pareto.png")
    assert out == tmp_path / "pareto.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_select_on_the_real_sweep(sweep: Path) -> None:
    summary = summarise(collect(sweep))
    choice = select(summary, ["params<1e6"])  # litecnn ~0.49 M, mobilenetv3 ~1.5 M
    assert choice["best"]["model"] == "litecnn" and len(choice["candidates"]) == 1
    assert select(summary, ["params<1M", "model==litecnn"])["best"]["model"] == "litecnn"
    both = select(summary, ["size_mb<=100"])
    assert len(both["candidates"]) == 2
    assert both["best"]["test_auc"] == max(g["test_auc"] for g in summary)
    assert select(summary, ["size_mb<=0.01"]) is None


def test_corrupt_results_are_skipped_with_a_warning(sweep: Path, tmp_path: Path, caplog) -> None:
    tree = _copy(sweep, tmp_path / "sweep")
    half = tree / "4_litecnn_synthlesion_none_seed2" / "results.json"
    half.parent.mkdir()
    half.write_text('{"status": "ok", "model": {"name": "lite')  # a write cut short
    other = tree / "5_notes" / "results.json"
    other.parent.mkdir()
    other.write_text("[1, 2]")
    with caplog.at_level(logging.WARNING, logger="medlite.sweeps.aggregate"):
        records = collect(tree)
    assert sorted(r["job"] for r in records) == JOBS
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(half) in warned and str(other) in warned


def test_failed_jobs_are_counted_and_listed(sweep: Path, tmp_path: Path) -> None:
    tree = _copy(sweep, tmp_path / "sweep")
    # failed during training (pipeline): same configuration as litecnn, no test/efficiency
    crashed = json.loads((tree / JOBS[0] / "results.json").read_text())
    for key in ("test", "val", "efficiency", "best_checkpoint"):
        crashed.pop(key, None)
    crashed.update(status="failed", seed=2, error="training loss became NaN at step 3\ndetails")
    (tree / "4_litecnn_synthlesion_none_seed2").mkdir()
    (tree / "4_litecnn_synthlesion_none_seed2" / "results.json").write_text(json.dumps(crashed))
    # failed before training (medlite.cli records a stub, no task): a group with no successful
    # run; an older stub named its data by flag only
    stub = {
        "status": "failed",
        "error": "compress=prune cannot prune vim (state-space blocks)",
        "failed_before_training": True,
        "model": {"name": "vim", "arch": "vim_tiny", "paradigm": "linear"},
        "compress": {"name": "prune"},
        "data": {"flag": "synthlesion", "size": 28},
        "seed": 0,
    }
    (tree / "5_vim_synthlesion_prune_seed0").mkdir()
    (tree / "5_vim_synthlesion_prune_seed0" / "results.json").write_text(json.dumps(stub))

    clean = {g["model"]: g for g in summarise(collect(sweep))}
    summary = {g["model"]: g for g in summarise(collect(tree))}
    lite = summary["litecnn"]
    assert (lite["n"], lite["n_failed"], lite["seeds"]) == (2, 1, [0, 1])
    assert lite["test_auc"] == clean["litecnn"]["test_auc"]  # the failure changes no mean
    vim = summary["vim"]
    assert (vim["paradigm"], vim["n"], vim["n_failed"], vim["test_auc"]) == ("linear", 0, 1, None)
    assert vim["data"] == "synthlesion" and "task" not in vim
    assert not vim["pareto_latency"] and not vim["pareto_params"]
    assert select(list(summary.values()), [])["best"]["model"] != "vim"

    proc = _script(tree, "--out", tmp_path / "agg")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "6 job(s): 4 succeeded, 2 failed" in out
    assert "failed: 4_litecnn_synthlesion_none_seed2: training loss became NaN at step 3" in out
    assert "failed: 5_vim_synthlesion_prune_seed0: compress=prune cannot prune vim" in out
    assert "details" not in out  # first line of the error only
    md = (tmp_path / "agg" / "summary.md").read_text()
    assert "## linear" in md and "## Failed jobs" in md


# --------------------------------------------------------------------------- hand-made


def test_pareto_front_dominance_and_ties() -> None:
    pts = [
        {"auc": 0.90, "cost": 10},  # 0 front
        {"auc": 0.80, "cost": 5},  # 1 front
        {"auc": 0.80, "cost": 7},  # 2 same AUC as 1, costlier: dominated
        {"auc": 0.70, "cost": 5},  # 3 same cost as 1, worse: dominated
        {"auc": 0.95, "cost": 20},  # 4 front
        {"auc": 0.85, "cost": 30},  # 5 dominated by 4
        {"auc": 0.80, "cost": 5},  # 6 identical to 1: both kept
        {"auc": None, "cost": 1},  # 7 undefined AUC: left out
        {"auc": 0.60, "cost": 1},  # 8 cheapest: front
        {"auc": float("nan"), "cost": 0},  # 9 NaN: left out
        {"auc": 0.99},  # 10 no cost: left out
    ]
    assert pareto_front(pts, "auc", "cost") == [8, 1, 6, 0, 4]
    assert pareto_front(list(reversed(pts)), "auc", "cost") == [2, 4, 9, 10, 6]
    assert pareto_front([], "auc", "cost") == []
    assert pareto_front([{"auc": 0.5, "cost": 3}], "auc", "cost") == [0]


def test_pareto_front_of_a_metric_better_when_lower() -> None:
    pts = [{"err": 0.1, "cost": 10}, {"err": 0.3, "cost": 5}, {"err": 0.4, "cost": 7}]
    assert pareto_front(pts, "err", "cost", higher_is_better=False) == [1, 0]
    assert pareto_front(pts, "err", "cost") == [1, 2]  # read as a score, 0.4 at 7 wins


def test_one_seed_has_no_std_and_seeds_sort_numerically() -> None:
    base = {
        "paradigm": "cnn",
        "model": "m",
        "compress": "none",
        "data": "d",
        "size": 28,
        "task": BINARY_TASK,
    }
    records = [
        {**base, "seed": 10, "status": "ok", "test_auc": 0.8},
        {**base, "seed": 2, "status": "ok", "test_auc": 0.6},
        {**base, "model": "solo", "seed": 0, "status": "ok", "test_auc": 0.7},
    ]
    groups = {g["model"]: g for g in summarise(records)}
    assert groups["m"]["seeds"] == [2, 10]
    assert groups["m"]["test_auc_std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert (groups["solo"]["n"], groups["solo"]["test_auc"]) == (1, 0.7)
    assert groups["solo"]["test_auc_std"] is None


def _group(model: str, auc: float, latency: float, size_mb: float, params: int) -> dict:
    return {
        "paradigm": "cnn",
        "model": model,
        "compress": "none",
        "data": "breastmnist",
        "size": 28,
        "n": 3,
        "test_auc": auc,
        "test_auc_std": 0.01,
        "latency_ms": latency,
        "size_mb": size_mb,
        "params": params,
        "task": BINARY_TASK,
    }


SUMMARY = [
    _group("big", 0.92, 20.0, 40.0, 11_000_000),
    _group("mid", 0.88, 4.0, 3.5, 900_000),
    _group("small", 0.85, 1.5, 0.5, 120_000),
    _group("tie", 0.85, 1.0, 0.6, 130_000),  # same AUC as small, faster: preferred
    {**_group("broken", 0.0, 0.0, 0.0, 0), "n": 0, "test_auc": None},
]


def test_select_best_auc_within_a_budget() -> None:
    assert select(SUMMARY, [])["best"]["model"] == "big"
    choice = select(SUMMARY, ["latency_ms<=5", "size_mb<=4"])
    assert choice["best"]["model"] == "mid"
    assert [g["model"] for g in choice["candidates"]] == ["mid", "tie", "small"]
    assert choice["constraints"] == ["latency_ms<=5", "size_mb<=4"]
    assert select(SUMMARY, ["size_mb<2"])["best"]["model"] == "tie"
    assert select(SUMMARY, ["params<1e6", "auc>=0.86"])["best"]["model"] == "mid"
    assert select(SUMMARY, ["latency<2", "acc>0.5"]) is None  # no ACC recorded: never fits
    assert select(SUMMARY, ["latency_ms<1"]) is None
    assert select(SUMMARY, ["model!=big", "params>=500k"])["best"]["model"] == "mid"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("latency_ms=<5", "malformed"),
        ("latency_ms<=", "malformed"),
        ("lat<=5", "unknown key 'lat'.*latency_ms.*size_mb"),
        ("params<=many", "not a number"),
        ("model<=litecnn", "use == or !="),
    ],
)
def test_bad_constraints_are_config_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        select(SUMMARY, [text])


def test_constraint_parsing() -> None:
    metrics = sweep_metrics(SUMMARY)
    c = parse_constraint(" auc >= 0.85 ", metrics)
    assert (c.key, c.op, c.value, str(c)) == ("test_auc", ">=", 0.85, "test_auc>=0.85")
    assert parse_constraint("test_sensitivity>0.5", metrics).key == "test_sensitivity"
    with pytest.raises(ConfigError, match="unknown key 'auc'"):
        parse_constraint("auc>=0.85")  # no metric keys without the sweep's metrics
    assert parse_constraint("params<1.5M").value == 1.5e6
    assert parse_constraint("data==breastmnist").value == "breastmnist"
    assert not math.isnan(parse_constraint("size==28").value)


def _dice_records() -> list[dict]:
    base = {"paradigm": "cnn", "compress": "none", "data": "lesions", "size": 64}
    rows = []
    for model, dices, latency, params in (
        ("unet", (0.80, 0.84), 9.0, 2_000_000),
        ("tiny", (0.70, 0.72), 1.0, 100_000),
        ("slowbad", (0.60, 0.62), 20.0, 5_000_000),
    ):
        for seed, dice in enumerate(dices):
            rows.append(
                {
                    **base,
                    "model": model,
                    "seed": seed,
                    "status": "ok",
                    "task": DICE_TASK,
                    "test_dice": dice,
                    "test_iou": dice - 0.1,
                    "test_hd95": 5.0,
                    "latency_ms": latency,
                    "params": params,
                    "size_mb": params * 4 / 2**20,
                }
            )
    return rows


def test_another_task_aggregates_on_its_own_metrics(tmp_path: Path) -> None:
    """No metric name is built in: a task with Dice/IoU gets its columns, fronts and keys."""
    records = _dice_records()
    metrics = sweep_metrics(records)
    assert (metrics.kind, metrics.primary, metrics.headline) == (
        "segmentation",
        "dice",
        ("dice", "iou"),
    )
    summary = {g["model"]: g for g in summarise(records)}
    assert summary["unet"]["test_dice"] == pytest.approx(0.82)
    assert summary["unet"]["test_dice_std"] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert "test_auc" not in summary["unet"]
    assert summary["unet"]["pareto_latency"] and summary["tiny"]["pareto_latency"]
    assert not summary["slowbad"]["pareto_latency"] and not summary["slowbad"]["pareto_params"]
    assert "dice" in valid_keys(metrics) and "auc" not in valid_keys(metrics)
    rows = list(summary.values())
    assert select(rows, [])["best"]["model"] == "unet"
    assert select(rows, ["dice>=0.7", "latency<5"])["best"]["model"] == "tiny"
    with pytest.raises(ConfigError, match="unknown key 'auc'.*dice"):
        select(rows, ["auc>=0.5"])
    paths = write_tables(rows, tmp_path, records)
    md = paths["summary.md"].read_text()
    assert "| test Dice | test IoU | test HD95 |" in md and "test-Dice-vs-latency" in md
    with paths["summary.csv"].open() as f:
        header = next(csv.reader(f))
    assert {"test_dice", "test_dice_std", "test_iou", "test_hd95"} <= set(header)
    assert not any("auc" in col for col in header)
    assert plot_pareto(rows, tmp_path / "pareto.png").stat().st_size > 10_000


def test_a_sweep_holds_one_task_kind() -> None:
    mixed = [*_dice_records(), {**_dice_records()[0], "model": "cls", "task": BINARY_TASK}]
    with pytest.raises(ConfigError, match="2 kinds of task.*classification, segmentation"):
        summarise(mixed)


def test_metrics_of_different_task_types_are_united() -> None:
    """Binary and multi-class datasets in one sweep: every metric of either gets a column."""
    multiclass = ClassificationTask(MULTICLASS, ("a", "b", "c")).record()
    base = {"paradigm": "cnn", "model": "m", "compress": "none", "size": 28, "status": "ok"}
    records = [
        {**base, "data": "bin", "seed": 0, "task": BINARY_TASK, "test_auc": 0.9},
        {**base, "data": "multi", "seed": 0, "task": multiclass, "test_auc": 0.8},
    ]
    metrics = sweep_metrics(records)
    assert set(BINARY_TASK["metrics"]) | set(multiclass["metrics"]) == set(metrics.names)
    groups = {g["data"]: g for g in summarise(records)}
    assert groups["multi"]["test_sensitivity"] is None and groups["bin"]["test_auc"] == 0.9


# --------------------------------------------------------------------------- command line


def test_script_writes_everything_and_selects(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "agg"
    proc = _script(sweep, "--out", out, "--select", "params<1e6", "size_mb<=2")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "4 job(s): 4 succeeded, 0 failed" in text
    assert "selected for params<1e6 and size_mb<=2: litecnn/none" in text
    assert "litecnn" in text and "mobilenetv3" in text  # the summary table
    for name in ("aggregate.csv", "summary.csv", "summary.md", "pareto.png"):
        assert (out / name).stat().st_size > 0, name

    proc = _script(sweep, "--out", out, "--select", "latency_ms<=0.001")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "no model meets the budget latency_ms<=0.001" in text
    assert "latency_ms<=0.001: 0 of 2 group(s)" in text


def test_script_default_out_dir(sweep: Path, tmp_path: Path) -> None:
    tree = _copy(sweep, tmp_path / "sweep")
    assert _script(tree).returncode == 0
    assert (tree / "aggregate" / "summary.md").exists()
    assert len(collect(tree)) == 4  # its own outputs are not mistaken for runs


def test_script_errors_are_one_line_and_exit_1(sweep: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for args in (
        [tmp_path / "empty"],
        [tmp_path / "missing"],
        [sweep, "--out", tmp_path / "agg", "--select", "lat<=5"],
    ):
        proc = _script(*args)
        assert proc.returncode == 1, args
        assert "medlite: ConfigError" in proc.stderr and "Traceback" not in proc.stderr
    assert "no readable results.json" in _script(tmp_path / "empty").stderr
    assert not (tmp_path / "agg").exists()  # a bad constraint fails before writing anything


# --------------------------------------------------------------------------- trust as an axis


#: stage, test AUC, raw ECE, ECE after T, corrupted AUC, latency
PTQ_STAGES = [("before", 0.90, 0.09, 0.05, 0.76, 3.0), ("ptq", 0.89, 0.04, 0.03, 0.70, 0.5)]


def _stage(name: str, auc: float, ece: float, scaled: float, corrupted: float, latency, seed):
    """A results.json compression stage; seed 1 adds 0.02 to AUC and ECE."""
    auc, ece = auc + 0.02 * seed, ece + 0.02 * seed
    return {
        "stage": name,
        "test": {"auc": auc, "acc": 0.8, "ece": ece},
        "calibrated": {"temperature": 1.2, "test": {"ece": scaled}},
        "robustness": {"auc": {"clean": auc, "mean_corrupted": corrupted, "relative": 0.8}},
        "efficiency": {"params": 10_000, "latency_ms": latency, "size_mb": 0.1},
    }


def _trust_sweep(root: Path) -> Path:
    """Three configurations of one dataset as results.json files: the dense model ranks best
    but is the worst calibrated; its int8 compression is faster, better calibrated and less
    robust; a pruned one is the most robust. One run has no robustness record (measured off)."""
    configs = {  # name: (auc, ece, latency, corrupted auc)
        "dense": (0.90, 0.09, 3.0, 0.76),
        "ptq": (0.89, 0.04, 0.5, 0.70),
        "prune": (0.88, 0.06, 1.0, 0.80),
    }
    for i, (name, (auc, ece, latency, corrupted)) in enumerate(configs.items()):
        for seed in (0, 1):
            res = {
                "status": "ok",
                "seed": seed,
                "model": {"name": "litecnn", "arch": "litecnn", "paradigm": "cnn"},
                "compress": {"name": name},
                "data": {"name": "breastmnist", "size": 28},
                "task": BINARY_TASK,
                "test": {"auc": auc + 0.01 * seed, "acc": 0.8, "ece": ece},
                "efficiency": {"params": 10_000, "latency_ms": latency, "size_mb": 0.1},
            }
            if name == "ptq":  # a recipe: its stages, each with calibration and robustness
                res["compression"] = {"stages": [_stage(*stage, seed) for stage in PTQ_STAGES]}
            if not (name == "prune" and seed == 1):
                res["robustness"] = {
                    "runtime": "int8" if name == "ptq" else "pytorch",
                    "report": "robustness/robustness.json",
                    "auc": {"clean": auc, "mean_corrupted": corrupted, "relative": corrupted / auc},
                }
            job = root / f"{i}_{name}_seed{seed}"
            job.mkdir(parents=True)
            (job / "results.json").write_text(json.dumps(res))
    return root


def test_robustness_and_ece_are_metrics_an_axis_and_a_budget(tmp_path: Path) -> None:
    records = collect(_trust_sweep(tmp_path / "sweep"))
    metrics = sweep_metrics(records)
    assert {"corrupted_auc", "relative_auc"} <= set(metrics.names)
    assert metrics.title("corrupted_auc") == "corrupted AUC"
    by_compress = {g["compress"]: g for g in summarise(records, metrics)}
    prune = by_compress["prune"]
    assert prune["test_corrupted_auc"] == pytest.approx(0.80) and prune["n"] == 2  # one measured
    assert by_compress["dense"]["test_relative_auc"] == pytest.approx(0.76 / 0.905, abs=0.01)
    # default fronts, AUC vs latency: ptq is faster and ranks better than prune
    assert by_compress["dense"]["pareto_latency"] and by_compress["ptq"]["pareto_latency"]
    assert not by_compress["prune"]["pareto_latency"]
    # ECE (lower is better) as the axis: the dense model is slower and worse calibrated than ptq
    on_ece = {g["compress"]: g for g in summarise(records, metrics, axis="ece")}
    assert on_ece["ptq"]["pareto_latency"] and not on_ece["dense"]["pareto_latency"]
    assert not on_ece["prune"]["pareto_latency"]
    on_robust = {g["compress"]: g for g in summarise(records, metrics, axis="corrupted_auc")}
    assert on_robust["prune"]["pareto_latency"] and not on_robust["dense"]["pareto_latency"]
    with pytest.raises(ConfigError, match="no test metric 'fog'.*corrupted_auc"):
        summarise(records, metrics, axis="fog")
    rows = list(by_compress.values())
    assert select(rows, ["ece<=0.05"], metrics)["best"]["compress"] == "ptq"
    assert select(rows, ["corrupted_auc>=0.78"], metrics)["best"]["compress"] == "prune"
    md = write_tables(rows, tmp_path / "agg", records, metrics, "ece")["summary.md"].read_text()
    assert "test corrupted AUC" in md and "test-ECE-vs-latency" in md
    png = plot_pareto(rows, tmp_path / "ece.png", metrics.axis("ece"))
    assert png.stat().st_size > 10_000
    # without robustness records, no robustness columns
    assert not any(m.startswith("corrupted_") for m in sweep_metrics(_dice_records()).names)


def test_compression_stages_over_seeds(tmp_path: Path) -> None:
    records = collect(_trust_sweep(tmp_path / "sweep"))
    rows = summarise_stages(records)
    assert [(r["compress"], r["stage"], r["n"]) for r in rows] == [
        ("ptq", "before", 2),
        ("ptq", "ptq", 2),
    ]
    before = rows[0]
    assert before["test_auc"] == pytest.approx(0.91) and before["test_ece"] == pytest.approx(0.10)
    assert before["test_auc_std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert before["test_ece_scaled"] == pytest.approx(0.05) and before["test_ece_scaled_std"] == 0
    assert rows[1]["test_corrupted_auc"] == pytest.approx(0.70) and rows[1]["latency_ms"] == 0.5
    md = write_tables(summarise(records), tmp_path / "agg", records)["stages.md"].read_text()
    assert "## litecnn + ptq on breastmnist (28 px)" in md
    assert "| stage | n | AUC | ACC | ECE | ECE after T | corrupted AUC | relative AUC |" in md
    assert "| ptq | 2 | 0.900 ± 0.014 |" in md
    # a sweep without compression has no stages table
    assert not summarise_stages(_dice_records())
    assert "stages.md" not in write_tables(
        summarise(_dice_records()), tmp_path / "d", _dice_records()
    )


def test_script_puts_ece_on_the_pareto_axis(tmp_path: Path) -> None:
    sweep = _trust_sweep(tmp_path / "sweep")
    proc = _script(sweep, "--pareto-on", "ece", "--select", "ece<=0.05")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "test ECE" in text and "test corrupted AUC" in text  # the axis and robustness shown
    assert "selected for test_ece<=0.05: litecnn/ptq" in text
    assert "compression stages" in text and "ECE after T" in text  # the recipe's stages table
    assert (sweep / "aggregate" / "stages.md").is_file()
    assert (sweep / "aggregate" / "pareto.png").is_file()
    proc = _script(sweep, "--pareto-on", "fog")
    assert proc.returncode == 1 and "no test metric 'fog'" in proc.stderr


# --------------------------------------------------------------------------- deployed latency

#: model: (test AUC, params, eager profile latency ms, the export's measurement per seed or None
#: when the run was not exported). Eager ranks litecnn < mobilenetv3 < resnet18 on latency, all on
#: the AUC-vs-latency front; deployed (int8 runtimes) makes resnet18 faster than mobilenetv3,
#: which drops off the front. mobilenetv3's seeds deploy on different runtimes.
DEPLOY_CONFIGS = {
    "litecnn": (0.85, 490_000, 1.2, None),
    "mobilenetv3": (
        0.88,
        1_520_000,
        3.2,
        (
            {"onnx_fp32": 2.3, "onnx_int8": 1.7, "openvino_fp32": 2.0, "openvino_int8": 1.8},
            {"onnx_fp32": 2.2, "onnx_int8": 1.7, "openvino_fp32": 1.9, "openvino_int8": 1.6},
        ),
    ),
    "resnet18": (
        0.91,
        11_200_000,
        6.5,
        (
            {"onnx_fp32": 4.1, "onnx_int8": 1.9, "openvino_fp32": 3.0, "openvino_int8": 1.4},
            {"onnx_fp32": 4.0, "onnx_int8": 1.8, "openvino_fp32": 3.1, "openvino_int8": 1.4},
        ),
    ),
}


def _efficiency(eager: float, deployed: dict[str, float] | None, params: int = 10_000) -> dict:
    """An efficiency profile as results.json has it; with ``deployed``, what export adds: every
    runtime that passed parity and eager PyTorch re-measured in the same process."""
    eff = {
        "params": params,
        "macs": params * 40,
        "size_mb": round(params * 4 / 2**20, 3),
        "latency_ms": eager,
        "latency_p90_ms": round(eager * 1.1, 4),
        "throughput_ips": round(2000 / eager, 1),
        "threads": 2,
    }
    if deployed is not None:
        measured = {"pytorch": round(eager * 0.97, 4), **deployed}
        fastest = min(measured, key=measured.get)
        eff.update(
            eager_latency_ms=measured["pytorch"],
            deployed_latency_ms=measured[fastest],
            deployed_runtime=fastest,
            deployed=measured,
            deployed_threads=2,
        )
    return eff


def _deploy_sweep(root: Path) -> Path:
    """Three models x two seeds on one dataset as results.json files, two of them exported."""
    for i, (model, (auc, params, eager, deployed)) in enumerate(DEPLOY_CONFIGS.items()):
        for seed in (0, 1):
            res = {
                "status": "ok",
                "seed": seed,
                "model": {"name": model, "arch": model, "paradigm": "cnn"},
                "compress": {"name": "none"},
                "data": {"name": "breastmnist", "size": 28},
                "task": BINARY_TASK,
                "test": {"auc": auc + 0.01 * seed, "acc": auc - 0.05},
                "efficiency": _efficiency(eager + 0.1 * seed, deployed and deployed[seed], params),
            }
            job = root / f"{i}_{model}_seed{seed}"
            job.mkdir(parents=True)
            (job / "results.json").write_text(json.dumps(res))
    return root


def test_records_use_the_deployed_latency_by_default_and_eager_on_request(tmp_path: Path) -> None:
    sweep = _deploy_sweep(tmp_path / "sweep")
    for rec in collect(sweep):
        eff = json.loads((sweep / rec["job"] / "results.json").read_text())["efficiency"]
        assert rec["eager_latency_ms"] == eff["latency_ms"]  # the profile, not the re-measure
        if rec["model"] == "litecnn":  # not exported: eager, and says so
            assert rec["deployed_latency_ms"] is None
            assert (rec["latency_ms"], rec["latency_runtime"]) == (eff["latency_ms"], "pytorch")
        else:
            assert rec["latency_ms"] == rec["deployed_latency_ms"] == eff["deployed_latency_ms"]
            assert rec["latency_runtime"] == eff["deployed_runtime"]
            assert rec["latency_ms"] == min(eff["deployed"].values()) < rec["eager_latency_ms"]
    resnet = [r for r in collect(sweep) if r["model"] == "resnet18"]
    assert {r["latency_runtime"] for r in resnet} == {"openvino_int8"}
    for rec in collect(sweep, latency="eager"):
        assert rec["latency_ms"] == rec["eager_latency_ms"] and rec["latency_runtime"] == "pytorch"
        assert (rec["deployed_latency_ms"] is None) == (rec["model"] == "litecnn")  # still kept


def test_invalid_latency_is_a_config_error(tmp_path: Path) -> None:
    sweep = _deploy_sweep(tmp_path / "sweep")
    with pytest.raises(ConfigError, match="latency must be one of deployed, eager.*'onnx'"):
        collect(sweep, latency="onnx")
    with pytest.raises(ConfigError, match="mix latencies"):
        summarise([*collect(sweep), *collect(sweep, latency="eager")])


def test_summary_runtime_fronts_and_budgets_follow_the_latency(tmp_path: Path) -> None:
    sweep = _deploy_sweep(tmp_path / "sweep")
    deployed = {g["model"]: g for g in summarise(collect(sweep))}
    eager = {g["model"]: g for g in summarise(collect(sweep, latency="eager"))}
    assert deployed["resnet18"]["latency_runtime"] == "openvino_int8"
    assert deployed["mobilenetv3"]["latency_runtime"] == "onnx_int8/openvino_int8"  # per seed
    assert deployed["litecnn"]["latency_runtime"] == "pytorch"
    assert {g["latency_runtime"] for g in eager.values()} == {"pytorch"}
    assert deployed["resnet18"]["latency_ms"] == pytest.approx(1.4)
    assert deployed["mobilenetv3"]["latency_ms"] == pytest.approx(1.65)
    assert deployed["mobilenetv3"]["eager_latency_ms"] == pytest.approx(3.25)
    assert eager["resnet18"]["latency_ms"] == pytest.approx(6.55)
    assert eager["resnet18"]["deployed_latency_ms"] == pytest.approx(1.4)
    assert deployed["litecnn"]["deployed_latency_ms"] is None
    # eager: each model buys accuracy with latency, all on the front; deployed: resnet18 is
    # both faster and better than mobilenetv3
    assert all(g["pareto_latency"] for g in eager.values())
    on_front = {m for m, g in deployed.items() if g["pareto_latency"]}
    assert on_front == {"litecnn", "resnet18"}
    assert [g["pareto_params"] for g in deployed.values()] == [
        g["pareto_params"] for g in eager.values()
    ]
    # a latency budget reads the same latency
    assert select(list(deployed.values()), ["latency_ms<=2"])["best"]["model"] == "resnet18"
    assert select(list(eager.values()), ["latency_ms<=2"])["best"]["model"] == "litecnn"
    assert select(list(eager.values()), ["deployed_latency_ms<=2"])["best"]["model"] == "resnet18"
    assert select(list(deployed.values()), ["runtime==pytorch"])["best"]["model"] == "litecnn"


def test_tables_and_plot_say_which_latency(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    labels = []
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, path, **kw: labels.append(fig.axes[0].get_xlabel())
    )
    sweep = _deploy_sweep(tmp_path / "sweep")
    for latency in ("deployed", "eager"):
        records = collect(sweep, latency=latency)
        summary = summarise(records)
        paths = write_tables(summary, tmp_path / latency, records)
        md = paths["summary.md"].read_text()
        assert LATENCIES[latency] in md
        assert "| latency (ms) | runtime | Pareto |" in md
        resnet = next(line for line in md.splitlines() if line.startswith("| resnet18 |"))
        runtime = "openvino_int8" if latency == "deployed" else "pytorch"
        assert f"| {summary[-1]['latency_ms']:.2f} | {runtime} |" in resnet
        with paths["summary.csv"].open() as f:
            rows = {r["model"]: r for r in csv.DictReader(f)}
        assert rows["mobilenetv3"]["latency_runtime"] == (
            "onnx_int8/openvino_int8" if latency == "deployed" else "pytorch"
        )
        assert rows["litecnn"]["deployed_latency_ms"] == ""
        with paths["aggregate.csv"].open() as f:
            header = next(csv.reader(f))
        i = header.index("latency_ms")
        assert header[i : i + 4] == [
            "latency_ms",
            "latency_runtime",
            "eager_latency_ms",
            "deployed_latency_ms",
        ]
        plot_pareto(summary, tmp_path / latency / "pareto.png")
    assert labels[0].startswith("deployed CPU latency") and "eager" not in labels[0]
    assert labels[1].startswith("eager PyTorch CPU latency")
    assert LATENCIES["deployed"].startswith("deployed latency (fastest exported runtime")
    assert LATENCIES["eager"] == "eager PyTorch latency"


def test_compression_stages_keep_their_own_latency(tmp_path: Path) -> None:
    sweep = _trust_sweep(tmp_path / "sweep")
    for file in sweep.glob("1_ptq_seed*/results.json"):  # the int8 recipe, exported
        res = json.loads(file.read_text())
        res["efficiency"] = _efficiency(0.5, {"onnx_int8": 0.3, "openvino_int8": 0.35})
        file.write_text(json.dumps(res))
    records = collect(sweep)
    ptq = {g["compress"]: g for g in summarise(records)}["ptq"]
    assert (ptq["latency_ms"], ptq["latency_runtime"]) == (pytest.approx(0.3), "onnx_int8")
    stages = {r["stage"]: r["latency_ms"] for r in summarise_stages(records)}
    assert stages == {"before": pytest.approx(3.0), "ptq": pytest.approx(0.5)}


def test_script_ranks_on_deployed_latency_unless_told_eager(tmp_path: Path) -> None:
    sweep = _deploy_sweep(tmp_path / "sweep")
    proc = _script(sweep, "--select", "latency_ms<=2")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "selected for latency_ms<=2: resnet18/none" in text
    assert "latency 1.40 ms (openvino_int8)" in text
    assert "runtime" in text and "onnx_int8/openvino_int8" in text  # the printed table
    assert " ".join(LATENCIES["deployed"].split()) in text  # its caption
    md = (sweep / "aggregate" / "summary.md").read_text()
    assert LATENCIES["deployed"] in md

    proc = _script(sweep, "--latency", "eager", "--select", "latency_ms<=2")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "selected for latency_ms<=2: litecnn/none" in text
    assert "latency 1.25 ms (pytorch)" in text and "eager PyTorch latency" in text
    assert "openvino_int8" not in text
    assert LATENCIES["eager"] in (sweep / "aggregate" / "summary.md").read_text()


def test_script_rejects_an_unknown_latency(tmp_path: Path) -> None:
    sweep = _deploy_sweep(tmp_path / "sweep")
    proc = _script(sweep, "--latency", "fastest")
    assert proc.returncode == 2
    assert "--latency: invalid choice: 'fastest'" in proc.stderr
    assert "deployed" in proc.stderr and "eager" in proc.stderr
    assert not (sweep / "aggregate").exists()
    help_text = " ".join(_script("--help").stdout.split())
    assert "--latency {deployed,eager}" in help_text and "parity" in help_text
