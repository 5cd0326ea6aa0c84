"""What distillation recovered: the teacher-student gap on the monitored metric, and a warning
when the teacher is no better than the student it teaches."""

from __future__ import annotations

import logging

import pytest

from medlite.compress.recipe import kd_recovery
from medlite.tasks import BINARY, ClassificationTask

TASK = ClassificationTask(BINARY, ("a", "b"))


def _row(val: float, test: float) -> dict:
    return {"val": {"auc": val}, "test": {"auc": test}}


def test_share_of_the_gap_recovered() -> None:
    out = kd_recovery(_row(0.90, 0.89), _row(0.80, 0.85), _row(0.86, 0.88), TASK)
    assert out["metric"] == "auc"
    assert out["val"]["gap"] == pytest.approx(0.10)
    assert out["val"]["recovered_share"] == pytest.approx(0.6)
    assert out["test"]["recovered_share"] == pytest.approx(0.75)


def test_a_teacher_weaker_than_its_student_is_warned_about(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="medlite.compress.recipe"):
        out = kd_recovery(_row(0.86, 0.86), _row(0.91, 0.91), _row(0.88, 0.88), TASK)
    assert out["val"]["gap"] == pytest.approx(-0.05) and out["val"]["recovered_share"] is None
    assert "not better than the student it teaches" in caplog.text


def test_without_a_student_baseline_only_the_teacher_and_result_are_kept() -> None:
    out = kd_recovery(_row(0.90, 0.89), None, _row(0.86, 0.88), TASK)
    assert out["val"] == {
        "teacher": 0.90,
        "student_before": None,
        "student_after": 0.86,
        "gap": None,
        "recovered_share": None,
    }
    assert kd_recovery(None, None, _row(0.86, 0.88), TASK) is None


@pytest.mark.parametrize(
    ("teacher", "student", "warned"), [(0.80, 0.82, True), (0.90, 0.86, False)]
)
def test_from_scratch_a_student_level_with_its_teacher_is_warned_about(
    caplog, teacher: float, student: float, warned: bool
) -> None:
    """compress=kd trains the student from scratch: no student-alone row, so the warning compares
    the teacher with the distilled student."""
    with caplog.at_level(logging.WARNING, logger="medlite.compress.recipe"):
        kd_recovery(_row(teacher, teacher), None, _row(student, student), TASK)
    assert ("matches or beats its teacher" in caplog.text) is warned
