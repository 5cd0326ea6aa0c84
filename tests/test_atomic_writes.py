"""Nothing half-written on a full disk: every file medlite must not lose (checkpoints,
results.json, sweep_summary.json, exports, the model card, the MD5 cache) is written through
:mod:`medlite.atomic`; ENOSPC injected into each writer leaves no truncated file under a final
name, no temporary file, and one DiskFullError naming the folder and the space needed and free.
Files are created with the umask's permissions, like any other output."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from medlite import atomic
from medlite.atomic import DiskFullError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    """Atomic writes of files whose (temporary) name contains one of ``state["names"]`` (all if
    None) write half their bytes, then fail as a full disk does."""
    state: dict = {"names": None, "hits": []}
    real = atomic._write

    def write(f, data) -> None:
        name = str(f.name)
        if state["names"] is None or any(part in name for part in state["names"]):
            state["hits"].append(name)
            real(f, memoryview(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        real(f, data)

    monkeypatch.setattr(atomic, "_write", write)
    return state


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def normal_file_mode(folder: Path) -> int:
    plain = folder / "plain.txt"
    plain.write_text("x")
    return mode(plain)


# ------------------------------------------------------------------ the helper itself
def test_full_disk_keeps_the_old_file_and_says_where_and_how_much(tmp_path, full_disk) -> None:
    target = tmp_path / "out" / "results.json"
    target.parent.mkdir()
    target.write_text('{"old": true}')
    with pytest.raises(DiskFullError) as err:
        atomic.write_bytes(target, b"x" * 3_000_000)
    msg = str(err.value)
    assert str(target.parent) in msg and "results.json" in msg
    assert "2.9 MB needed" in msg and "free there" in msg
    assert "\n" not in msg
    assert target.read_text() == '{"old": true}'
    assert temporaries(tmp_path) == []


def test_disk_full_is_recognised_through_wrappers() -> None:
    wrapped = RuntimeError("export failed")
    wrapped.__cause__ = ENOSPC
    assert atomic.is_disk_full(wrapped)
    assert atomic.is_disk_full(RuntimeError("file write failed: No space left on device"))
    assert not atomic.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_failing_writer_leaves_no_temporary(tmp_path) -> None:
    with pytest.raises(ValueError), atomic.atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise ValueError("writer bug")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_records_get_the_umask_permissions_of_any_file(tmp_path, umask) -> None:
    from medlite.results import write_json
    from medlite.sweeps.summary import SweepSummary

    old = os.umask(umask)
    try:
        expected = normal_file_mode(tmp_path)
        write_json(tmp_path / "results.json", {"status": "ok"})
        sweep = tmp_path / "sweep"
        (sweep / "0_job").mkdir(parents=True)
        write_json(sweep / "0_job" / "results.json", {"status": "ok", "test": {"auc": 0.9}})
        SweepSummary().on_multirun_end(_sweep_config(sweep))
    finally:
        os.umask(old)
    assert expected == 0o666 & ~umask
    assert mode(tmp_path / "results.json") == expected
    assert mode(sweep / "sweep_summary.json") == expected


def _sweep_config(sweep: Path):
    from omegaconf import OmegaConf

    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})


# ------------------------------------------------------------------ each writer
def test_results_json_on_a_full_disk(tmp_path, full_disk) -> None:
    from medlite.results import write_json

    path = tmp_path / "results.json"
    full_disk["names"] = ["never"]
    write_json(path, {"status": "running"})
    full_disk["names"] = None
    with pytest.raises(DiskFullError, match="results.json"):
        write_json(path, {"status": "ok", "test": {"auc": 0.9}})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert full_disk["hits"] and temporaries(tmp_path) == []


def test_sweep_summary_on_a_full_disk(tmp_path, full_disk, caplog) -> None:
    from medlite.results import write_json
    from medlite.sweeps.summary import SweepSummary

    full_disk["names"] = [".sweep_summary."]
    (tmp_path / "0_job").mkdir()
    write_json(tmp_path / "0_job" / "results.json", {"status": "ok"})  # not a summary: written
    with caplog.at_level(logging.WARNING):
        SweepSummary().on_multirun_end(_sweep_config(tmp_path))  # a summary never fails a sweep
    assert full_disk["hits"]
    assert not (tmp_path / "sweep_summary.json").exists()
    assert "disk full" in caplog.text and temporaries(tmp_path) == []


def test_weights_files_on_a_full_disk(tmp_path, full_disk) -> None:
    """Teacher weights (and the compressed model's weights) go through the same writer."""
    from medlite.checkpoints import save_weights

    with pytest.raises(DiskFullError, match="teacher.ckpt"):
        save_weights(nn.Linear(64, 64), tmp_path / "teacher.ckpt", {"arch": "linear"})
    assert list(tmp_path.iterdir()) == []


def test_lightning_checkpoints_are_atomic_with_umask_permissions(tmp_path, full_disk) -> None:
    from medlite.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    full_disk["names"] = ["never"]
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "last.ckpt")
    assert mode(tmp_path / "last.ckpt") == normal_file_mode(tmp_path)
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"], torch.ones(3))
    full_disk["names"] = None
    with pytest.raises(DiskFullError, match="last.ckpt"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "last.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"], torch.ones(3))
    assert temporaries(tmp_path) == []


def test_a_run_on_a_full_disk_ends_with_one_message(tmp_path, full_disk, capsys) -> None:
    """The first checkpoint of a training run hits a full disk: no checkpoint under a final
    name, results.json records the failure, and the command line prints one line."""
    from medlite.cli import train
    from tests.helpers import make_cfg

    full_disk["names"] = [".ckpt"]
    out = tmp_path / "run"
    cfg = make_cfg(out, ["debug=limit", "callbacks=none", "profile.enabled=false"])
    with pytest.raises(SystemExit) as exit_:
        train(cfg)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "DiskFullError" in err and "disk full" in err and "Traceback" not in err
    assert str(out / "checkpoints") in " ".join(err.split())
    assert full_disk["hits"]
    assert not list((out / "checkpoints").glob("*.ckpt")) and temporaries(out) == []
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and "disk full" in results["error"]


def test_a_full_disk_under_lightning_still_ends_with_one_message(
    tmp_path, full_disk, monkeypatch, capsys
) -> None:
    """The checkpoint and Lightning's own logger fail (the logger's ENOSPC is a plain OSError,
    raised again while Lightning cleans up after the failed checkpoint): still one DiskFullError,
    and results.json (which fitted) records it."""
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    from medlite.cli import train
    from tests.helpers import make_cfg

    def save(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_file_path))

    monkeypatch.setattr(ExperimentWriter, "save", save)
    full_disk["names"] = [".ckpt"]
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train(make_cfg(out, ["debug=limit", "callbacks=none", "profile.enabled=false"]))
    err = capsys.readouterr().err
    assert "DiskFullError" in err and "Traceback" not in err and "OSError" not in err
    assert not list(out.rglob("*.ckpt")) and temporaries(out) == []
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and results["error"].startswith("disk full")


def test_disk_full_in_finds_the_first_disk_full_error(tmp_path) -> None:
    first = atomic.disk_full_error(tmp_path / "last.ckpt", 5_000_000)
    try:
        try:
            raise first
        except DiskFullError:
            raise OSError(errno.ENOSPC, "No space left on device", "metrics.csv") from None
    except OSError as later:
        assert atomic.disk_full_in(later, tmp_path) is first
    plain = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "metrics.csv"))
    assert str(tmp_path / "x") in str(atomic.disk_full_in(plain, tmp_path))
    assert atomic.disk_full_in(ValueError("bad value"), tmp_path) is None


def test_onnx_export_on_a_full_disk(tmp_path, monkeypatch) -> None:
    from medlite.deploy import onnx as onnx_mod

    def exporter(model, x, path, opset) -> None:
        Path(path).write_bytes(b"\x08\x07partial-onnx")
        raise RuntimeError("serialisation failed") from ENOSPC

    monkeypatch.setitem(onnx_mod._EXPORTERS, "dynamo", exporter)
    monkeypatch.setitem(onnx_mod._EXPORTERS, "legacy", exporter)
    with pytest.raises(DiskFullError, match="model.onnx"):
        onnx_mod.export_onnx(nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 8, 8), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_torch_export_on_a_full_disk(tmp_path, monkeypatch) -> None:
    from medlite.deploy import export as export_mod

    def save(program, path) -> None:
        Path(path).write_bytes(b"PK\x03\x04partial")
        raise ENOSPC

    monkeypatch.setattr(torch.export, "save", save)
    with pytest.raises(DiskFullError, match="model.pt2"):
        export_mod._torch_export(nn.Linear(4, 2).eval(), torch.zeros(2, 4), tmp_path / "model.pt2")
    assert list(tmp_path.iterdir()) == []


def test_int8_copy_on_a_full_disk(tmp_path, full_disk, monkeypatch) -> None:
    import shutil

    src = tmp_path / "src" / "model_int8.onnx"
    src.parent.mkdir()
    src.write_bytes(b"q" * 1000)

    def copyfile(a, b):
        Path(b).write_bytes(b"q" * 10)
        raise ENOSPC

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    with pytest.raises(DiskFullError, match="model_int8.onnx"):
        atomic.copy_file(src, tmp_path / "export" / "model_int8.onnx")
    assert list((tmp_path / "export").iterdir()) == []


def test_export_json_and_model_card_on_a_full_disk(tmp_path, full_disk, monkeypatch) -> None:
    from medlite.deploy import model_card

    class Run:
        path = tmp_path

    monkeypatch.setattr(model_card, "TrainedRun", Run)
    monkeypatch.setattr(model_card, "build_card", lambda run: {"model": "tiny"})
    monkeypatch.setattr(model_card, "render_markdown", lambda card, root: "# tiny\n" * 100)
    (tmp_path / model_card.CARD_MD).write_text("# the old card\n")
    (tmp_path / model_card.CARD_JSON).write_text('{"old": true}')
    full_disk["names"] = [".md"]
    with pytest.raises(DiskFullError, match=model_card.CARD_MD):
        model_card.write_model_card(Run())
    assert (tmp_path / model_card.CARD_MD).read_text() == "# the old card\n"
    (tmp_path / model_card.CARD_JSON).write_text('{"old": true}')
    full_disk["names"] = [".json"]  # model_card.json (export.json: the same write_json)
    with pytest.raises(DiskFullError, match=model_card.CARD_JSON):
        model_card.write_model_card(Run())
    assert (tmp_path / model_card.CARD_JSON).read_text() == '{"old": true}'
    assert temporaries(tmp_path) == []


def test_md5_cache_on_a_full_disk_stays_whole(tmp_path, full_disk, monkeypatch, caplog) -> None:
    from medlite.data import medmnist as mm

    monkeypatch.setenv("MEDLITE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "breastmnist.npz"
    data.write_bytes(b"npz")
    full_disk["names"] = ["never"]
    mm._remember_md5(data, "a" * 32)
    cache_file = tmp_path / "cache" / mm._MD5_CACHE_NAME
    before = cache_file.read_text()
    data.write_bytes(b"npz, a newer version")
    full_disk["names"] = None
    with caplog.at_level(logging.WARNING):
        mm._remember_md5(data, "b" * 32)  # best effort: only re-hashing is lost
    assert cache_file.read_text() == before and "disk full" in caplog.text
    assert temporaries(tmp_path) == []
