"""The README's "Add your own dataset" steps, followed literally: its source file and YAML
(read from the README) make a new ``data=`` option that trains through the real pipeline."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from medlite.errors import ConfigError, DataError
from medlite.pipeline import run
from tests.helpers import make_cfg

README = Path(__file__).resolve().parents[2] / "README.md"
MODULE = "split_archives"  # the file name the README gives the source


def _readme_block(kind: str) -> str:
    """The fenced block after ``<!-- example-source: <kind> -->`` in the README."""
    text = README.read_text()
    match = re.search(rf"<!-- example-source: {kind} -->\n```{kind}\n(.*?)```", text, re.S)
    assert match, f"README lost its {kind} example of a data source"
    return match.group(1)


@pytest.fixture
def new_option(tmp_path, monkeypatch) -> Path:
    """Put the README's two files where Python and Hydra find them: the module on sys.path
    (in place of medlite/data/sources/), the YAML in an extra config folder's data group."""
    code_dir, conf_dir = tmp_path / "code", tmp_path / "conf" / "data"
    code_dir.mkdir()
    conf_dir.mkdir(parents=True)
    (code_dir / f"{MODULE}.py").write_text(_readme_block("python"))
    yaml = _readme_block("yaml").replace(f"medlite.data.sources.{MODULE}.", f"{MODULE}.")
    assert f"_target_: {MODULE}.SplitArchives" in yaml
    (conf_dir / f"{MODULE}.yaml").write_text(yaml)
    monkeypatch.syspath_prepend(str(code_dir))
    yield tmp_path / "conf"
    sys.modules.pop(MODULE, None)


def _export(root: Path, shared_data: Path) -> None:
    """BreastMNIST written the way the example's lab tool writes a dataset."""
    root.mkdir()
    with np.load(shared_data / "breastmnist.npz") as npz:
        for split in ("train", "val", "test"):
            np.savez(
                root / f"{split}.npz",
                images=npz[f"{split}_images"],
                labels=npz[f"{split}_labels"].reshape(-1),
            )


def test_readme_source_trains_through_the_pipeline(new_option, shared_data, tmp_path) -> None:
    export = tmp_path / "lab_export"
    _export(export, shared_data)
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        [
            f"hydra.searchpath=[file://{new_option}]",
            f"data={MODULE}",
            f"data.root={export}",
            "trainer.max_epochs=1",
            "callbacks=none",
            "profile.enabled=false",
        ],
    )
    assert cfg.data.name == "lab_export"
    run(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["data"]["source"] == "split_archives"
    assert results["data"]["labels"] == ["normal", "abnormal"]
    assert results["data"]["n_samples"] == {"train": 546, "val": 78, "test": 156}
    assert results["task"]["type"] == "binary-class"
    assert 0.0 <= results["test"][results["task"]["headline"][0]] <= 1.0


def test_readme_source_refuses_bad_settings_and_files(new_option, shared_data, tmp_path):
    from medlite.build import build_datamodule

    with pytest.raises(ConfigError, match="not a folder"):
        cfg = make_cfg(
            tmp_path / "a",
            [f"hydra.searchpath=[file://{new_option}]", f"data={MODULE}", "data.root=/nowhere"],
        )
        build_datamodule(cfg)
    export = tmp_path / "half"
    _export(export, shared_data)
    (export / "val.npz").unlink()
    cfg = make_cfg(
        tmp_path / "b",
        [f"hydra.searchpath=[file://{new_option}]", f"data={MODULE}", f"data.root={export}"],
    )
    with pytest.raises(DataError, match="val.npz is missing"):
        build_datamodule(cfg).setup()
