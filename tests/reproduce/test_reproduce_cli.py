"""``scripts/reproduce.py`` end to end on a tiny budget: the three outputs, resuming without
retraining, and a failing run recorded as a row instead of a crash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medlite.reproduce.cli import main
from medlite.reproduce.runner import LAUNCH_FILE

RECIPE = "medmnist_v2/breastmnist/resnet18_28"
#: a debug budget with the small default network: checks the machinery, not the paper
TINY = ["--override", "debug=limit", "model=litecnn", "callbacks=none"]


def _run(out: Path, data_dir: Path | str, *extra: str, seeds: int = 2) -> int:
    args = [RECIPE, "--seeds", str(seeds), "--out", str(out), "--data-dir", str(data_dir)]
    return main([*args, *TINY, *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    # a folder a crashed earlier attempt left behind: moved aside, not deleted, not reused
    stale = out / "runs" / "medmnist_v2__breastmnist__resnet18_28" / "seed1"
    stale.mkdir(parents=True)
    (stale / "train.log").write_text("killed\n")
    assert _run(out, shared_data, "--jobs", "2") == 0
    return out


def test_writes_the_table_csv_and_plot(tiny: Path) -> None:
    md = (tiny / "reproduction.md").read_text()
    assert "overrides debug=limit model=litecnn callbacks=none (not the paper's protocol)" in md
    row = next(line for line in md.splitlines() if line.startswith("| breastmnist ResNet-18 (28)"))
    assert "| 0.901 |" in row and "| 0.863 |" in row  # published AUC and ACC beside ours
    assert "Yang J" in md and "confirmed: 3 public quotes" in md  # source and check
    with (tiny / "reproduction.csv").open() as f:
        (rec,) = list(csv.DictReader(f))
    runs = [json.loads((tiny / "runs" / rec["recipe"].removeprefix("paper/").replace("/", "__") / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]  # fmt: skip
    aucs = [r["test"]["auc"] for r in runs]
    assert float(rec["auc_ours"]) == pytest.approx(sum(aucs) / 2)
    assert float(rec["auc_diff"]) == pytest.approx(sum(aucs) / 2 - 0.901)
    assert rec["n"] == "2" and rec["seeds"] == "0;1" and float(rec["params"]) > 0
    assert [r["seed"] for r in runs] == [0, 1] and all(
        r["model"]["name"] == "litecnn" for r in runs
    )
    assert (tiny / "reproduction.png").read_bytes()[:4] == b"\x89PNG"
    aside = tiny / "runs" / "medmnist_v2__breastmnist__resnet18_28" / "seed1.attempt1"
    assert (aside / "train.log").read_text() == "killed\n"


def test_resumes_without_retraining(tiny: Path, shared_data: Path, capsys) -> None:
    runs = tiny / "runs" / "medmnist_v2__breastmnist__resnet18_28"
    before = {s: (runs / f"seed{s}" / "results.json").stat().st_mtime_ns for s in (0, 1)}
    capsys.readouterr()
    assert _run(tiny, shared_data) == 0
    out = capsys.readouterr().out
    assert out.count("(reused)") == 2
    assert {s: (runs / f"seed{s}" / "results.json").stat().st_mtime_ns for s in (0, 1)} == before
    assert json.loads((runs / "seed0" / LAUNCH_FILE).read_text())["seed"] == 0


def test_a_failing_run_is_a_row_not_a_crash(tmp_path: Path, capsys) -> None:
    out = tmp_path / "fails"
    assert _run(out, tmp_path / "no_data_here", seeds=1) == 1  # every run failed
    md = (out / "reproduction.md").read_text()
    assert "## Failed runs" in md and "breastmnist" in md.split("## Failed runs")[1]
    assert "| breastmnist ResNet-18 (28) | 0 (1 failed) |" in md
    assert "failed" in capsys.readouterr().out


def test_list_and_unknown_names(capsys) -> None:
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "medmnist_v2/breastmnist/resnet18_28" in listed and "AUC 0.901" in listed
    assert main(["medmnist_v2/nosuch"]) == 1
    assert "no recipe or group 'medmnist_v2/nosuch'" in capsys.readouterr().err


def test_a_run_is_reused_only_while_its_config_composes_the_same(tiny: Path) -> None:
    """The launch record holds a hash of the composed config, so a recipe whose inherited defaults
    changed (say the default teacher) is retrained; where outputs go does not count."""
    from medlite.reproduce.recipes import select
    from medlite.reproduce.runner import config_fingerprint

    (kd,) = select("review/compression/breastmnist/kd")
    same = config_fingerprint(kd, 0, [])
    assert same is not None and same == config_fingerprint(kd, 0, ["paths.data_dir=/elsewhere"])
    assert config_fingerprint(kd, 0, ["teacher=resnet18"]) != same
    assert config_fingerprint(kd, 1, []) != same
    assert config_fingerprint(kd, 0, ["no_such_key=1"]) is None  # the run reports that itself
    launch = json.loads((tiny / "runs" / "medmnist_v2__breastmnist__resnet18_28" / "seed0" / LAUNCH_FILE).read_text())  # fmt: skip
    (recipe,) = select(RECIPE)
    assert launch["config"] == config_fingerprint(recipe, 0, TINY[1:])


def test_report_only_writes_the_table_of_finished_runs_and_trains_nothing(
    tiny: Path, shared_data: Path, capsys
) -> None:
    capsys.readouterr()
    assert _run(tiny, shared_data, "--report-only", seeds=3) == 0
    out = capsys.readouterr().out
    assert out.count("(reused)") == 2 and "1 run(s) not finished yet" in out
    assert not (tiny / "runs" / "medmnist_v2__breastmnist__resnet18_28" / "seed2").exists()
    with (tiny / "reproduction.csv").open() as f:
        (rec,) = list(csv.DictReader(f))
    assert rec["n"] == "2" and rec["n_failed"] == "0"
