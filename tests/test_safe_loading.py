"""A model file from someone else never runs code: every door a user can point at a file through
(teacher.ckpt_path, compress.base_ckpt, resume=, predict.py run=, results.json's
best_checkpoint) reads weights only, and a malicious pickle is one clear ConfigError with no
code run. Compressed models round-trip through weights + structural record, and a run folder
that was moved or copied uses its own files."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from medlite.checkpoints import run_file
from medlite.compress.lowrank import LowRankStep
from medlite.compress.prune import StructuredPruneStep
from medlite.compress.quantize import PostTrainingQuantization
from medlite.compress.structure import (
    FORMAT,
    context_build_args,
    load_compressed,
    save_compressed,
)
from medlite.deploy.onnx import OrtModel
from medlite.deploy.run_dir import TrainedRun
from medlite.errors import ConfigError
from medlite.pipeline import run
from medlite.resume import prepare_resume
from tests.helpers import make_cfg, model_and_context

REPO = Path(__file__).resolve().parents[1]
FAST = ["debug=limit", "callbacks=none", "profile.enabled=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious(path: Path, marker: Path, **extra) -> Path:
    """A checkpoint-looking file whose unpickling runs code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model.w": _Payload(marker)}, "epoch": 3, **extra}, path)
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "pickled" in text
    return text


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code_ran"


def test_the_payload_really_runs_code_when_unpickled(tmp_path: Path, marker: Path) -> None:
    """Guards the tests below: the file is malicious, so 'no marker' means 'no code ran'."""
    torch.load(malicious(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_no_unsafe_load_remains_in_the_package() -> None:
    """No ``weights_only=False`` anywhere, every ``torch.load`` call says ``weights_only=True``,
    and ``torch.export.load`` (which may unpickle) reads only the program export just wrote."""
    files = [*(REPO / "medlite").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    files += list(REPO.glob("*.py"))
    unsafe, unmarked = [], []
    for path in files:
        text = path.read_text()
        if "weights_only=False" in text.replace(" ", ""):
            unsafe.append(str(path))
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == "torch.export.load" and path.name != "export.py":
                unmarked.append(f"{path.name}:{node.lineno} {name} (it may unpickle)")
            if name in ("torch.load", "pickle.load", "pickle.loads", "torch.serialization.load"):
                safe = any(
                    k.arg == "weights_only" and getattr(k.value, "value", None) is True
                    for k in node.keywords
                )
                if not safe:
                    unmarked.append(f"{path.name}:{node.lineno} {name}")
    assert not unsafe and not unmarked, (unsafe, unmarked)


# ---------------------------------------------------------------------------------- the doors
@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> Path:
    """A debug-sized pruned run on the embedded data: compressed/model.pt in the new format."""
    out = tmp_path_factory.mktemp("pruned_run") / "run"
    overrides = [*FAST, "compress=prune", "compress.steps.0.iterative_steps=1"]
    overrides += ["compress.steps.0.epochs=1", "compress.steps.0.recover_batches=0"]
    run(make_cfg(out, overrides))
    return out


def test_teacher_ckpt_path_door(tmp_path: Path, marker: Path) -> None:
    evil = malicious(tmp_path / "teacher.ckpt", marker)
    cfg = make_cfg(tmp_path / "run", [*FAST, "compress=kd", f"teacher.ckpt_path={evil}"])
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert str(evil) in _one_line(err)
    assert not marker.exists()


def test_compress_base_ckpt_door(tmp_path: Path, marker: Path) -> None:
    evil = malicious(tmp_path / "base.ckpt", marker)
    cfg = make_cfg(tmp_path / "run", [*FAST, "compress=prune", f"compress.base_ckpt={evil}"])
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert "compress.base_ckpt" in _one_line(err)
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_resume_door(tmp_path: Path, marker: Path) -> None:
    """``resume=`` reads last.ckpt weights-only before Lightning is given it."""
    killed = tmp_path / "killed"
    saved = make_cfg(killed, FAST)
    (killed / ".hydra").mkdir(parents=True)
    OmegaConf.save(saved, killed / ".hydra" / "config.yaml")
    malicious(killed / "checkpoints" / "last.ckpt", marker, global_step=7)
    cfg = make_cfg(tmp_path / "new", [*FAST, f"+resume={killed}"])
    with pytest.raises(ConfigError) as err:
        prepare_resume(cfg, [f"resume={killed}"])
    assert "last.ckpt" in _one_line(err)
    assert not marker.exists()


def test_lightning_reads_checkpoints_weights_only_whatever_the_environment(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's own load (resume's continued fit) is weights-only even where torch's
    default was switched off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``)."""
    from medlite.checkpoint_io import AtomicCheckpointIO

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = malicious(tmp_path / "last.ckpt", marker)
    with pytest.raises(Exception, match="[Ww]eights.only"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.open", "subprocess.Popen"])
def test_resume_refuses_a_saved_config_that_names_foreign_code(
    tmp_path: Path, marker: Path, target: str
) -> None:
    """resume= instantiates the run's saved config: callbacks, loggers, optimisers... only."""
    killed = tmp_path / "killed"
    saved = make_cfg(killed, FAST)
    OmegaConf.set_struct(saved, False)
    saved.callbacks = {"evil": {"_target_": target, "file": str(marker), "mode": "w"}}
    (killed / ".hydra").mkdir(parents=True)
    OmegaConf.save(saved, killed / ".hydra" / "config.yaml")
    cfg = make_cfg(tmp_path / "new", [*FAST, f"+resume={killed}"])
    with pytest.raises(ConfigError, match=target):
        prepare_resume(cfg, [f"resume={killed}"])
    assert not marker.exists()


def _fake_run(folder: Path, **results) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"status": "ok", **results}))
    return folder


def test_predict_door_compressed_model(tmp_path: Path, marker: Path) -> None:
    folder = _fake_run(tmp_path / "sent")
    malicious(folder / "compressed" / "model.pt", marker)
    with pytest.raises(ConfigError) as err:
        TrainedRun.load(folder).torch_model()
    assert "re-create it" in _one_line(err)
    assert not marker.exists()


def test_old_pickled_module_is_refused_with_how_to_recreate_it(tmp_path: Path) -> None:
    folder = _fake_run(tmp_path / "old")
    path = folder / "compressed" / "model.pt"
    path.parent.mkdir()
    torch.save({"format": "medlite-module-v1", "model": nn.Linear(2, 2), "meta": {}}, path)
    with pytest.raises(ConfigError) as err:
        TrainedRun.load(folder).torch_model()
    assert "compress.base_ckpt=" in _one_line(err)


def test_best_checkpoint_door(pruned_run: Path, tmp_path: Path, marker: Path) -> None:
    """A run folder whose recorded best checkpoint is malicious: deploying it runs no code."""
    sent = tmp_path / "sent"
    shutil.copytree(pruned_run, sent)
    shutil.rmtree(sent / "compressed")  # so the PyTorch model comes from best_checkpoint
    recorded = json.loads((sent / "results.json").read_text())["best_checkpoint"]
    malicious(sent / recorded, marker)
    with pytest.raises(ConfigError) as err:
        TrainedRun.load(sent).torch_model()
    assert Path(recorded).name in _one_line(err)
    assert not marker.exists()


@pytest.mark.parametrize(
    "recorded",
    ["{outside}/best.ckpt", "../outside/best.ckpt", "checkpoints/../../outside/best.ckpt"],
)
def test_best_checkpoint_outside_the_run_is_refused(tmp_path: Path, recorded: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save({"state_dict": {}}, outside / "best.ckpt")  # harmless, but not the run's own
    recorded = recorded.format(outside=outside)
    folder = _fake_run(tmp_path / "sent", best_checkpoint=recorded, run_dir=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="outside its run directory"):
        TrainedRun.load(folder).torch_model()


def test_symlink_out_of_the_run_is_refused(tmp_path: Path, marker: Path) -> None:
    evil = malicious(tmp_path / "elsewhere" / "model.pt", marker)
    folder = _fake_run(tmp_path / "sent")
    (folder / "compressed").mkdir()
    (folder / "compressed" / "model.pt").symlink_to(evil)
    with pytest.raises(ConfigError, match="outside its run directory"):
        TrainedRun.load(folder).torch_model()
    assert not marker.exists()


def test_a_model_record_can_only_create_known_layers(tmp_path: Path, marker: Path) -> None:
    """The structural record is data: an unknown layer type or a kwarg that loads a file is
    refused, and the file itself is read weights-only."""
    model, ctx = model_and_context(tmp_path, ["model=litecnn"], seed=0)
    build = context_build_args(ctx)
    good = save_compressed(model, tmp_path / "m.pt", build)
    blob = torch.load(good, weights_only=True)
    bad = {**blob, "structure": json.dumps({"replaced": {"head": {"type": "system"}}})}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="unknown layer type"):
        load_compressed(tmp_path / "bad.pt")
    build["model"]["kwargs"] = {"checkpoint_path": str(malicious(tmp_path / "w.pth", marker))}
    torch.save({**blob, "build": json.dumps(build)}, tmp_path / "kw.pt")
    with pytest.raises(ConfigError, match="load files"):
        load_compressed(tmp_path / "kw.pt")
    assert not marker.exists()


# -------------------------------------------------------------- compressed models round-trip
def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_pruned_model_round_trips(tmp_path: Path) -> None:
    model, ctx = model_and_context(tmp_path, ["model=litecnn"], seed=0)
    pruned = StructuredPruneStep(ratio=0.5, iterative_steps=1, recover_batches=0).prepare(
        model, ctx
    )
    x = ctx.example_input(4)
    path = save_compressed(pruned, tmp_path / "model.pt", context_build_args(ctx), x)
    blob = torch.load(path, weights_only=True)  # no code in the file
    assert blob["format"] == FORMAT and json.loads(blob["structure"])["attributes"]
    assert torch.equal(_outputs(pruned, x), _outputs(load_compressed(path), x))


@pytest.mark.parametrize(
    ("model", "kinds"),
    [("litecnn", {"LowRankConv1x1"}), ("resnet18", {"TuckerConv2d", "LowRankConv1x1"})],
)
def test_lowrank_model_round_trips(tmp_path: Path, model: str, kinds: set[str]) -> None:
    net, ctx = model_and_context(tmp_path, [f"model={model}"], seed=0)
    step = LowRankStep(rank_ratio=0.5, min_params=0, epochs=0, exclude=["layer3", "layer4"])
    factorised = step.prepare(net, ctx)
    x = ctx.example_input(4)
    path = save_compressed(factorised, tmp_path / "model.pt", context_build_args(ctx), x)
    loaded = load_compressed(path)
    assert torch.equal(_outputs(factorised, x), _outputs(loaded, x))
    layers = [(n, type(m).__name__) for n, m in loaded.named_modules()]
    assert layers == [(n, type(m).__name__) for n, m in factorised.named_modules()]
    assert kinds <= {kind for _, kind in layers}


def test_quantized_model_round_trips(tmp_path: Path) -> None:
    """ptq keeps an int8 ONNX file (protobuf, no code) and its fp32 PyTorch model in the new
    format; both reload to the same outputs."""
    model, ctx = model_and_context(tmp_path, ["model=litecnn", "max_step_batches=2"], seed=0)
    x = ctx.example_input(4)
    fp32 = _outputs(model, x)
    int8 = PostTrainingQuantization(calibration_batches=2).prepare(model, ctx)
    folder = tmp_path / "compressed"
    assert torch.equal(fp32, _outputs(load_compressed(folder / "model_fp32.pt"), x))
    again = OrtModel(folder / "model_int8.onnx")
    assert torch.equal(_outputs(int8, x), _outputs(again, x))


# ------------------------------------------------------------------- a run folder that moves
def _image(run_dir: Path, path: Path) -> Path:
    spec = json.loads((run_dir / "results.json").read_text())["data"]["preprocess"]
    size, chans = int(spec["input_size"]), len(spec["mean"])
    pixels = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels if chans == 1 else np.stack([pixels] * 3, -1)).save(path)
    return path


def test_results_record_paths_relative_to_the_run(pruned_run: Path) -> None:
    res = json.loads((pruned_run / "results.json").read_text())
    for recorded in (res["best_checkpoint"], res["compression"]["saved"]):
        assert not Path(recorded).is_absolute()
        assert (pruned_run / recorded).is_file()
    assert res["compression"]["saved"] == "compressed/model.pt"


def test_moved_run_predicts_from_its_own_files(pruned_run: Path, tmp_path: Path) -> None:
    from medlite.deploy.predict import Predictor

    image = _image(pruned_run, tmp_path / "scan.png")
    want = Predictor(pruned_run, runtime="pytorch").predict_file(image).probabilities
    moved = tmp_path / "moved"
    shutil.copytree(pruned_run, moved)
    # an older record: absolute paths of where the run was made
    res = json.loads((moved / "results.json").read_text())
    res["best_checkpoint"] = str(pruned_run / res["best_checkpoint"])
    (moved / "results.json").write_text(json.dumps(res))
    # the original's files are not used: breaking them changes nothing for the copy
    original = tmp_path / "original_gone"
    pruned_run.rename(original)
    try:
        got = Predictor(moved, runtime="pytorch").predict_file(image).probabilities
        ckpt = TrainedRun.load(moved)._local(res["best_checkpoint"])
    finally:
        original.rename(pruned_run)
    assert got == pytest.approx(want, abs=1e-6)
    assert ckpt.is_relative_to(moved.resolve()) and ckpt.is_file()


def test_run_file_keeps_old_absolute_records_inside_the_run(tmp_path: Path) -> None:
    here = tmp_path / "here"
    (here / "checkpoints").mkdir(parents=True)
    old = "/elsewhere/run/checkpoints/best.ckpt"
    assert run_file(old, here, "/elsewhere/run") == (here / "checkpoints" / "best.ckpt").resolve()
    with pytest.raises(ConfigError):
        run_file(old, here, "/other")


@pytest.mark.slow  # a fresh interpreter: ~10 s of imports
def test_predict_cli_prints_one_line_and_runs_no_code(
    pruned_run: Path, tmp_path: Path, marker: Path
) -> None:
    """At the command line: exit 1, the reason on one line, no traceback, no code run."""
    sent = tmp_path / "sent"
    shutil.copytree(pruned_run, sent)
    malicious(sent / "compressed" / "model.pt", marker)
    image = _image(sent, tmp_path / "scan.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), f"run={sent}", f"input={image}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "pickled" in out and not marker.exists()
