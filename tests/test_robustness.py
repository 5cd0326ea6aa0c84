"""Robustness under corruptions: the corruptions themselves, and ``scripts/robustness.py`` end to
end on a tiny run of the embedded synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medlite.errors import ConfigError
from medlite.pipeline import run
from medlite.robustness import CORRUPTIONS, SEVERITIES, corrupt, corrupt_all
from medlite.robustness.evaluate import CLEAN, RobustnessSettings, check_task
from medlite.robustness.run import main
from medlite.tasks import SEGMENTATION, get_task
from tests.helpers import make_cfg, run_with_robustness_at_severity_1


def _images(channels: int | None) -> np.ndarray:
    """Eight textured 28 px uint8 images (mid-grey, so brightening has room to act)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    base = 128 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    stack = np.stack([base + rng.normal(0, 20, base.shape) for _ in range(8)])
    stack = np.clip(stack, 0, 255).astype(np.uint8)
    return stack if channels is None else np.repeat(stack[..., None], channels, axis=-1)


@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_keeps_shape_and_dtype_and_is_deterministic(name: str, channels) -> None:
    images = _images(channels)
    a = corrupt_all(images, name, 3, seed=7)
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, corrupt_all(images, name, 3, seed=7))
    # one image alone is corrupted as it is inside the stack (independent of batching)
    np.testing.assert_array_equal(a[5], corrupt(images[5], name, 3, seed=7, index=5))


def test_noise_follows_the_seed() -> None:
    images = _images(None)
    assert not np.array_equal(
        corrupt_all(images, "gaussian_noise", 2, seed=0),
        corrupt_all(images, "gaussian_noise", 2, seed=1),
    )


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_change_grows_with_severity(name: str) -> None:
    images = _images(None)
    diffs = [np.abs(corrupt_all(images, name, s).astype(float) - images).mean() for s in SEVERITIES]
    assert diffs[0] > 0.5, diffs  # severity 1 already visibly changes the image
    assert all(b > a for a, b in zip(diffs, diffs[1:], strict=False)), diffs


def test_unknown_corruption_or_severity_is_refused() -> None:
    image = _images(None)[0]
    with pytest.raises(KeyError, match="unknown corruption"):
        corrupt(image, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(image, "contrast", 6)
    with pytest.raises(ConfigError, match="severities"):
        RobustnessSettings(severities=[0])
    with pytest.raises(ConfigError, match="corruptions"):
        RobustnessSettings(corruptions=["fog"])
    check_task(get_task(SEGMENTATION, ["background", "lesion"]), 2)  # 2D masks: measured
    with pytest.raises(ConfigError, match="2D classification and segmentation"):
        check_task(get_task(SEGMENTATION, ["background", "lesion"]), 3)


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """LiteCNN, ``debug=limit`` on the embedded synthetic lesions, robustness at the end (at
    severity 1 only, to keep the test short; the script's test covers the others)."""
    out = tmp_path_factory.mktemp("robust_run")
    cfg = make_cfg(
        out,
        ["debug=limit", "callbacks=none", "profile.enabled=false", "eval.robustness=true"],
    )
    run_with_robustness_at_severity_1(cfg)
    return out


def test_training_hook_records_the_summary(tiny_run: Path) -> None:
    res = json.loads((tiny_run / "results.json").read_text())
    summary = res["robustness"]
    primary = res["task"]["monitor"].rsplit("/", 1)[-1]
    assert summary["runtime"] == "pytorch" and summary["n_test_images"] == 400
    assert summary["report"] == "robustness/robustness.json"  # relative: the run can move
    s = summary[primary]
    assert s[CLEAN] == pytest.approx(res["test"][primary], abs=1e-6)  # the same test split
    assert 0 <= s["mean_corrupted"] <= 1
    assert s["relative"] == pytest.approx(s["mean_corrupted"] / s[CLEAN])
    record = json.loads((tiny_run / "robustness" / "robustness.json").read_text())
    assert len(record["rows"]) == 1 + len(CORRUPTIONS)  # clean + each corruption at severity 1


def test_script_writes_every_corruption_and_severity(tiny_run: Path) -> None:
    rc = main([f"run={tiny_run}", "severities=[1,5]", "limit=40", "seed=3"])
    assert rc == 0
    folder = tiny_run / "robustness"
    record = json.loads((folder / "robustness.json").read_text())
    cells = {(r["corruption"], r["severity"]) for r in record["rows"]}
    assert cells == {(CLEAN, 0)} | {(c, s) for c in CORRUPTIONS for s in (1, 5)}
    assert record["n_test_images"] == 40 and record["runtime"] == "pytorch"
    for row in record["rows"]:
        assert all(0 <= row[m] <= 1 for m in record["metrics"])
    table = (folder / "robustness.md").read_text()
    assert all(f"| {c} |" in table for c in CORRUPTIONS) and "| clean |" in table
    assert (folder / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    # the same settings give the same numbers (seeded noise, deterministic model)
    assert main([f"run={tiny_run}", "severities=[1,5]", "limit=40", "seed=3"]) == 0
    again = json.loads((folder / "robustness.json").read_text())
    assert again["rows"] == record["rows"]


def test_script_asks_for_the_export_of_a_missing_onnx_file(tiny_run: Path, capsys) -> None:
    assert main([f"run={tiny_run}", "runtime=int8", "limit=8"]) == 1  # never exported
    assert "scripts/export.py" in capsys.readouterr().err
    assert main([f"run={tiny_run}", "runtime=tflite"]) == 1


def test_script_scores_the_exported_onnx_file(tiny_run: Path) -> None:
    from medlite.deploy.export import ExportSettings, export_run

    export_run(tiny_run, ExportSettings(formats=["onnx_fp32"]))
    assert main([f"run={tiny_run}", "runtime=onnx_fp32", "severities=[2]", "limit=20"]) == 0
    record = json.loads((tiny_run / "robustness" / "robustness_onnx.json").read_text())
    assert record["runtime"] == "onnx" and len(record["rows"]) == 1 + len(CORRUPTIONS)
    assert (tiny_run / "robustness" / "robustness_onnx.png").is_file()
    assert (tiny_run / "robustness" / "robustness.json").is_file()  # PyTorch's report kept


def test_training_does_not_measure_robustness_unless_asked(tmp_path: Path) -> None:
    assert make_cfg(tmp_path).eval.robustness is False


# ---------------------------------------------------------------------- every compression stage
#: structured pruning (its recovery batches draw from the run's random stream) then int8
CHAIN = (
    "compress.steps=[{kind: prune, ratio: 0.5, iterative_steps: 2, recover_batches: 2, "
    "epochs: 1}, {kind: ptq}]"
)


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory) -> Path:
    """Structured pruning then int8 PTQ of a debug-sized LiteCNN, robustness on (severity 1)."""
    out = tmp_path_factory.mktemp("robust_chain")
    cfg = make_cfg(
        out,
        [
            "debug=limit",
            "callbacks=none",
            "eval.robustness=true",
            "compress.name=chain",
            CHAIN,
        ],
    )
    run_with_robustness_at_severity_1(cfg)
    return out


def test_every_compression_stage_reports_calibration_and_robustness(compressed_run: Path) -> None:
    res = json.loads((compressed_run / "results.json").read_text())
    stages = {s["stage"]: s for s in res["compression"]["stages"]}
    assert list(stages) == ["before", "prune", "ptq/onnx_fp32", "ptq"]
    runtimes = {"before": "pytorch", "prune": "pytorch", "ptq/onnx_fp32": "onnx"}
    for name, row in stages.items():
        # calibration: raw ECE among the test metrics, ECE after the stage's own temperature
        assert 0 <= row["test"]["ece"] <= 1 and 0 <= row["calibrated"]["test"]["ece"] <= 1
        assert row["calibrated"]["temperature"] > 0
        # robustness: the clean score is this stage's own test AUC (same images, same runtime)
        robust = row["robustness"]
        assert robust["auc"][CLEAN] == pytest.approx(row["test"]["auc"], abs=1e-6), name
        assert robust["runtime"] == runtimes.get(name, "int8")
        report = json.loads((compressed_run / robust["report"]).read_text())
        assert report["summary"] == {k: v for k, v in robust.items() if isinstance(v, dict)}
        assert len(report["rows"]) == 1 + len(CORRUPTIONS)
    # non-final stages have their own reports; the final stage's is the run's (measured once)
    assert stages["prune"]["robustness"]["report"] == "robustness/stages/prune.json"
    assert (compressed_run / "robustness" / "stages" / "ptq_onnx_fp32.png").is_file()
    assert not (compressed_run / "robustness" / "stages" / "ptq.json").exists()
    assert stages["ptq"]["robustness"] == res["robustness"]
    # the final stage's calibration is the run's (the same model, the same val logits)
    final_t = stages["ptq"]["calibrated"]["temperature"]
    assert final_t == pytest.approx(res["calibration"]["temperature"], rel=1e-6)


def test_the_before_after_table_shows_trust_columns(compressed_run: Path) -> None:
    from rich.console import Console

    from medlite.results import compression_table

    res = json.loads((compressed_run / "results.json").read_text())
    console = Console(width=250, record=True)
    console.print(compression_table(res))
    text = console.export_text()
    assert "ECE after T" in text and "corrupted AUC (rel.)" in text
    ptq = res["compression"]["stages"][-1]
    rel = ptq["robustness"]["auc"]["relative"]
    assert f"{ptq['robustness']['auc']['mean_corrupted']:.4f} ({rel:.2f})" in text


def test_the_model_card_shows_each_stage_trust(compressed_run: Path) -> None:
    from medlite.deploy.export import ExportSettings, export_run

    export_run(compressed_run, ExportSettings(formats=["onnx_fp32"]))
    md = (compressed_run / "model_card.md").read_text()
    section = md.split("## Compression stages", 1)[1].split("\n## ", 1)[0]
    assert "| test ECE | ECE after T | corrupted AUC | relative robustness |" in section
    res = json.loads((compressed_run / "results.json").read_text())
    prune = res["compression"]["stages"][1]
    row = next(line for line in section.splitlines() if line.startswith("| prune |"))
    assert f"| {prune['robustness']['auc']['mean_corrupted']:.3f} |" in row


def test_measuring_the_stages_changes_no_training(compressed_run: Path, tmp_path: Path) -> None:
    """The same recipe without robustness trains the same models: measuring a stage draws
    nothing from the run's random stream (every DataLoader pass would take a seed from it)."""
    out = tmp_path / "plain"
    run(
        make_cfg(
            out,
            [
                "debug=limit",
                "callbacks=none",
                "compress.name=chain",
                CHAIN,
            ],
        )
    )
    measured = json.loads((compressed_run / "results.json").read_text())["compression"]
    plain = json.loads((out / "results.json").read_text())["compression"]
    assert all("robustness" not in s for s in plain["stages"])
    for a, b in zip(measured["stages"], plain["stages"], strict=True):
        assert a["test"] == b["test"], a["stage"]
