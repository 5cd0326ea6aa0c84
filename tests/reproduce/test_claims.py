"""The review's compression claim in the reproduction report: each run's compressed model against
its own uncompressed one (paired Δ, one-sided tolerance) and the cost cut, from hand-made run
records whose numbers are known."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from medlite.reproduce import recipes as rc
from medlite.reproduce import report
from medlite.reproduce.runner import RunRecord

PTQ = next(r for r in rc.discover() if r.id == "paper/review/compression/breastmnist/ptq")
TASK = {"titles": {"auc": "AUC", "acc": "ACC"}, "headline": ["auc", "acc"]}


def _stage(name: str, auc: float, acc: float, size: float, macs: float, **eff) -> dict:
    return {
        "stage": name,
        "test": {"auc": auc, "acc": acc},
        "efficiency": {"size_mb": size, "macs": macs, "latency_ms": 1.0, **eff},
    }


def _record(seed: int, before: dict, after: dict, tmp_path: Path) -> RunRecord:
    results = {
        "status": "ok",
        "task": TASK,
        "test": dict(after["test"]),
        "compression": {"stages": [before, _stage("ptq/onnx_fp32", 0, 0, 1, 1), after]},
        "efficiency": {"params": 100, "macs": after["efficiency"]["macs"], "latency_ms": 0.5},
        "wall_time_s": 60.0,
    }
    return RunRecord(PTQ, seed, tmp_path / f"seed{seed}", results=results)


def test_a_claim_row_is_paired_against_the_uncompressed_model(tmp_path: Path) -> None:
    records = [
        # seed 0 loses 0.004 AUC (kept), seed 1 loses 0.020 (mean paired loss 0.012 > 0.01)
        _record(0, _stage("before", 0.900, 0.80, 2.0, 10, deployed_latency_ms=0.8),
                _stage("ptq", 0.896, 0.82, 0.5, 10, deployed_latency_ms=0.4), tmp_path),
        _record(1, _stage("before", 0.880, 0.80, 2.0, 10, deployed_latency_ms=0.9),
                _stage("ptq", 0.860, 0.80, 0.5, 10, deployed_latency_ms=0.3), tmp_path),
    ]  # fmt: skip
    (row,) = report.summarise(records)
    assert row["kind"] == "claim" and row["n"] == 2 and row["tolerance"] == 0.01
    auc, acc = row["auc"], row["acc"]
    assert auc["ours"] == pytest.approx(0.878) and auc["published"] == pytest.approx(0.890)
    assert auc["diff"] == pytest.approx(-0.012) and auc["within"] is False
    assert acc["diff"] == pytest.approx(0.010) and acc["within"] is True  # a gain holds
    cut = row["cost_cut"]
    assert cut["size"] == pytest.approx(4.0) and cut["macs"] == pytest.approx(1.0)
    assert cut["latency_basis"] == "deployed"
    assert cut["latency"] == pytest.approx((0.8 / 0.4 + 0.9 / 0.3) / 2)
    assert row["latency_ms"] == pytest.approx(0.35)  # the compressed model, deployed

    md = report.markdown([row], "review/compression/breastmnist/ptq", "the paper's protocol")
    line = next(x for x in md.splitlines() if x.startswith("| breastmnist int8 PTQ"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:6] == ["0.878 ± 0.025", "0.890", "-0.012", "no"]
    assert cells[6:10] == ["0.810 ± 0.014", "0.800", "+0.010", "yes"]
    assert cells[10:13] == ["4.00×", "1.00×", "2.50×"]
    assert "AUC uncompressed" in md and "(a claim)" in md and "How each published" not in md

    paths = report.write([row], tmp_path / "out", "claim", "the paper's protocol")
    with paths["csv"].open() as f:
        (rec,) = list(csv.DictReader(f))
    assert rec["kind"] == "claim" and float(rec["size_cut"]) == pytest.approx(4.0)
    assert rec["auc_within"] == "False" and rec["acc_within"] == "True"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_without_deployed_latencies_the_cut_is_eager_and_says_so(tmp_path: Path) -> None:
    rec = _record(0, _stage("before", 0.9, 0.8, 2.0, 10), _stage("ptq", 0.9, 0.8, 1.0, 5), tmp_path)
    (row,) = report.summarise([rec])
    assert row["cost_cut"]["latency_basis"] == "profiled"
    assert row["cost_cut"]["latency"] == pytest.approx(1.0)
    assert row["cost_cut"]["macs"] == pytest.approx(2.0)


def test_a_run_without_compression_stages_is_an_error_row(tmp_path: Path) -> None:
    rec = _record(0, _stage("before", 0.9, 0.8, 2.0, 10), _stage("ptq", 0.9, 0.8, 1.0, 5), tmp_path)
    rec.results["compression"] = {"stages": []}
    (row,) = report.summarise([rec])
    assert row["auc"]["ours"] is None and row["auc"]["within"] is None
    assert row["errors"] == ["seed 0: the run has no compression stages to compare"]
    assert "## Failed runs" in report.markdown([row], "t", "b")


KD = next(r for r in rc.discover() if r.id == "paper/review/compression/breastmnist/kd")


def _kd_record(seed: int, teacher: float, distilled: float, tmp_path: Path) -> RunRecord:
    stages = [_stage("teacher", teacher, 0.8, 6.0, 30), _stage("kd", distilled, 0.8, 2.0, 10)]
    results = {
        "status": "ok",
        "task": TASK,
        "model": {"arch": "litecnn"},
        "test": dict(stages[-1]["test"]),
        "compression": {"stages": stages},
        "efficiency": {"params": 100, "macs": 10, "latency_ms": 0.5},
        "wall_time_s": 60.0,
    }
    return RunRecord(KD, seed, tmp_path / f"kd{seed}", results=results)


def test_distillation_reports_the_gap_to_the_student_alone_and_the_share_recovered(
    tmp_path: Path,
) -> None:
    """The student alone is the same seed's dense model of another recipe of the group."""
    alone = [
        _record(s, _stage("before", auc, 0.8, 2.0, 10), _stage("ptq", auc, 0.8, 0.5, 10), tmp_path)
        for s, auc in ((0, 0.86), (1, 0.88))
    ]
    for rec in alone:
        rec.results["model"] = {"arch": "litecnn"}
    kd = [_kd_record(0, 0.92, 0.90, tmp_path), _kd_record(1, 0.90, 0.88, tmp_path)]
    rows = {r["method"]: r for r in report.summarise([*kd, *alone])}
    gap = rows[KD.method_title()]["kd_gap"]
    assert gap["n"] == 2 and gap["teacher"] == pytest.approx(0.91)
    assert gap["alone"] == pytest.approx(0.87) and gap["distilled"] == pytest.approx(0.89)
    assert gap["gap"] == pytest.approx(0.04) and gap["recovered"] == pytest.approx(0.5)
    assert rows[PTQ.method_title()]["kd_gap"] is None  # not a distillation row
    md = report.markdown(list(rows.values()), "review/compression/breastmnist", "b")
    line = next(x for x in md.splitlines() if x.startswith("| breastmnist KD") and "%" in x)
    assert [c.strip() for c in line.strip("|").split("|")][1:] == [
        "2", "0.910", "0.870", "0.890", "+0.040", "50 %",
    ]  # fmt: skip
    # another seed, or another network, is not this student's baseline
    alone[1].results["model"] = {"arch": "resnet18"}
    gap = next(r for r in report.summarise([*kd, *alone]) if r["kd_gap"])["kd_gap"]
    assert gap["n"] == 1 and gap["recovered"] == pytest.approx((0.90 - 0.86) / (0.92 - 0.86))


def test_a_teacher_no_better_than_the_student_alone_recovers_nothing(tmp_path: Path) -> None:
    alone = _record(0, _stage("before", 0.91, 0.8, 2, 10), _stage("ptq", 0.9, 0.8, 1, 10), tmp_path)
    alone.results["model"] = {"arch": "litecnn"}
    (kd_row, _) = report.summarise([_kd_record(0, 0.88, 0.90, tmp_path), alone])
    assert kd_row["kd_gap"]["gap"] == pytest.approx(-0.03) and kd_row["kd_gap"]["recovered"] is None
    assert "| – |" in report.markdown([kd_row], "t", "b").split("Distillation")[1]
