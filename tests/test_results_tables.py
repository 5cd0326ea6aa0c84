"""The closing tables of a run (``medlite.results``): their metric columns come from the run's task
record, and the title names the dataset whatever its source."""

from __future__ import annotations

from rich.console import Console

from medlite.results import (
    compression_table,
    headline_metrics,
    metric_title,
    monitored_metric,
    primary_metric,
    print_summary,
)
from medlite.tasks import BINARY, ClassificationTask

DICE_TASK = {
    "kind": "segmentation",
    "metrics": ["dice", "iou", "hd95"],
    "titles": {"dice": "Dice", "iou": "IoU", "hd95": "HD95"},
    "headline": ["dice", "iou"],
    "monitor": "val/dice",
    "mode": "max",
}


def _render(renderable) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def _compressed(task: dict | None, test: dict) -> dict:
    eff = {"params": 1000, "macs": 2e6, "size_mb": 1.0, "latency_ms": 2.0, "throughput_ips": 50}
    results = {
        "compress": {"name": "ptq"},
        "compression": {
            "stages": [
                {"stage": "before", "test": test, "efficiency": eff},
                {"stage": "ptq", "test": test, "efficiency": {**eff, "latency_ms": 1.0}},
            ]
        },
    }
    if task is not None:
        results["task"] = task
    return results


def test_task_record_helpers() -> None:
    record = ClassificationTask(BINARY, ("a", "b")).record()
    assert monitored_metric(record) == record["monitor"].split("/")[-1]
    assert headline_metrics(record) == record["headline"]
    assert primary_metric(record) == (record["headline"][0], record["mode"])
    assert metric_title(record, "nosuchmetric") == "nosuchmetric"
    assert primary_metric({**DICE_TASK, "headline": ["iou"]}) == ("iou", "max")
    assert primary_metric({**DICE_TASK, "monitor": "val/hd95", "mode": "min"}) == ("dice", "max")
    assert primary_metric(
        {**DICE_TASK, "headline": ["hd95"], "monitor": "val/hd95", "mode": "min"}
    ) == (
        "hd95",
        "min",
    )


def test_compression_table_shows_the_task_headline_metrics() -> None:
    text = _render(compression_table(_compressed(DICE_TASK, {"dice": 0.81234, "iou": 0.7})))
    assert "test Dice" in text and "test IoU" in text and "0.8123" in text
    assert "HD95" not in text  # not a headline metric
    assert "(2.0x)" in text  # latency ratio against the first stage


def test_compression_table_of_an_older_run_rebuilds_its_task() -> None:
    """A results.json without a task block: the task its data block implies."""
    task = ClassificationTask(BINARY, ("a", "b"))
    results = _compressed(None, {m: 0.5 for m in task.metric_names})
    results["data"] = {"task": BINARY, "labels": ["a", "b"]}
    text = _render(compression_table(results))
    for m in task.headline:
        assert f"test {task.title(m)}" in text


def test_summary_title_names_the_dataset() -> None:
    base = {"model": {"name": "litecnn"}, "status": "ok", "test": {"dice": 0.8}, "task": DICE_TASK}
    own = _capture({**base, "data": {"name": "my_scans", "size": 64}})
    assert "litecnn on my_scans (64 px)" in own
    old = _capture({**base, "data": {"flag": "breastmnist", "size": 28}})
    assert "litecnn on breastmnist (28 px)" in old


def _capture(results: dict) -> str:
    console = Console(width=200, record=True)
    print_summary(results, console)
    return console.export_text()


def test_compression_table_ranks_stages_by_deployed_latency_when_measured() -> None:
    results = _compressed(None, {"auc": 0.9, "acc": 0.8})
    before, after = (s["efficiency"] for s in results["compression"]["stages"][:2])
    before |= {"deployed_latency_ms": 1.0, "deployed_runtime": "onnxruntime"}
    after |= {"latency_ms": 1.9, "deployed_latency_ms": 0.25, "deployed_runtime": "onnxruntime"}
    text = _render(compression_table(results))
    assert "deployed bs1 (ms)" in text and "eager bs1 (ms)" in text
    assert "0.250 (4.0x) ORT" in text  # speed-up over the first stage, deployed against deployed
    assert "1.900 (1.1x)" in text  # and eager against eager
    plain = _render(compression_table(_compressed(None, {"auc": 0.9, "acc": 0.8})))
    assert "deployed" not in plain and "latency bs1 (ms)" in plain  # eager only: as before
