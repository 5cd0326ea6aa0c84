"""The end-of-sweep summary: each job's status, first error line and primary test metric, which
comes from the job's task record (older results.json files get theirs rebuilt)."""

from __future__ import annotations

import json
from pathlib import Path

from medlite.sweeps.summary import summarise_sweep
from medlite.tasks import BINARY, ClassificationTask


def _job(sweep: Path, name: str, results: dict | str) -> None:
    (sweep / name).mkdir(parents=True)
    text = results if isinstance(results, str) else json.dumps(results)
    (sweep / name / "results.json").write_text(text)


def test_each_job_reports_its_task_primary_metric(tmp_path: Path) -> None:
    dice_task = {
        "kind": "segmentation",
        "metrics": ["dice", "iou"],
        "titles": {"dice": "Dice", "iou": "IoU"},
        "headline": ["dice", "iou"],
        "monitor": "val/dice",
        "mode": "max",
    }
    _job(
        tmp_path,
        "0_seg",
        {"status": "ok", "task": dice_task, "test": {"dice": 0.8, "iou": 0.7}, "wall_time_s": 3},
    )
    # written before results.json had a task block: rebuilt from the data block
    old = {"status": "ok", "data": {"task": BINARY, "labels": ["a", "b"]}, "test": {"auc": 0.9}}
    _job(tmp_path, "1_old", old)
    _job(tmp_path, "2_failed", {"status": "failed", "error": "NaN loss\ntraceback"})
    _job(tmp_path, "3_cut", '{"status": "ok", "te')
    (tmp_path / "4_missing" / ".hydra").mkdir(parents=True)

    summary = summarise_sweep(tmp_path)
    jobs = {j["job"]: j for j in summary["jobs"]}
    assert (summary["n_jobs"], summary["n_ok"], summary["n_failed"]) == (5, 2, 3)
    assert (jobs["0_seg"]["metric"], jobs["0_seg"]["test"]) == ("dice", 0.8)
    primary = ClassificationTask(BINARY, ("a", "b")).headline[0]
    assert (jobs["1_old"]["metric"], jobs["1_old"]["test"]) == (primary, 0.9)
    assert jobs["2_failed"]["error"] == "NaN loss" and jobs["2_failed"]["test"] is None
    assert jobs["3_cut"]["status"] == "unreadable"
    assert jobs["4_missing"]["status"] == "missing"
