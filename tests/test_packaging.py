"""medlite as a package: the file list of the wheel, configs and the Optuna plugin found in a
clone and in a non-editable install, console scripts and ``python -m medlite``, checkpoints that
Lightning's ``load_from_checkpoint`` rebuilds, and plots that leave matplotlib's backend alone."""

from __future__ import annotations

import json
import os
import shutil
import site as site_module
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

import medlite
from medlite.errors import ConfigError
from tests.helpers import make_cfg, subprocess_env

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
ABSTRACT_DATA = ("base", "medmnist", "medmnist3d")


# ------------------------------------------------------------------------------ the file list


def test_package_list_matches_the_folders() -> None:
    """pyproject lists packages by hand (two are mapped from elsewhere): a new subpackage that
    is not listed would be missing from every wheel."""
    from setuptools import find_packages

    listed = set(SETUPTOOLS["packages"])
    found = set(find_packages(str(REPO), include=["medlite", "medlite.*"]))
    assert listed - {"medlite.conf", "hydra_plugins"} == found


def test_configs_and_plugin_are_mapped_into_the_wheel() -> None:
    mapped = SETUPTOOLS["package-dir"]
    assert (REPO / mapped["medlite.conf"] / "train.yaml").is_file()
    assert (REPO / mapped["hydra_plugins"] / "medlite.py").is_file()
    assert not (REPO / mapped["hydra_plugins"] / "__init__.py").exists()  # a namespace package
    assert set(PYPROJECT["project"]["scripts"]) == {
        "medlite-train",
        "medlite-export",
        "medlite-benchmark",
        "medlite-predict",
        "medlite-reproduce",
    }


def test_conf_dir_in_a_clone_is_the_top_level_conf() -> None:
    assert medlite.CONF_DIR == REPO / "conf"


# ------------------------------------------------------------------------ python -m medlite


def test_module_entry_dispatches_commands(monkeypatch, capsys) -> None:
    from medlite.__main__ import main

    monkeypatch.setattr(sys, "argv", ["medlite"])  # main() rewrites it for the command
    assert main([]) == 2 and "usage" in capsys.readouterr().out
    assert main(["bogus"]) == 2 and "bogus" in capsys.readouterr().err
    assert main(["export", "--help"]) == 0 and "run" in capsys.readouterr().out
    assert sys.argv == ["medlite export", "--help"]


def test_train_runs_as_a_module_from_another_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "medlite", "train", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train is powered by Hydra" in proc.stdout and "synthetic" in proc.stdout


# ------------------------------------------------------------------------- the Optuna plugin


def test_hydra_plugin_scan_finds_the_optuna_sweeper() -> None:
    """Nothing registers the sweeper by hand: Hydra's own scan of ``hydra_plugins`` finds it (a
    fresh process, so no earlier test has touched Hydra's plugin registry)."""
    code = (
        "from hydra.core.plugins import Plugins\n"
        "from medlite.sweeps.optuna import OptunaSweeper\n"
        "cls = Plugins.instance().class_name_to_class['hydra_plugins.medlite.OptunaSweeper']\n"
        "assert issubclass(cls, OptunaSweeper), cls\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "register_with_hydra" not in (REPO / "train.py").read_text()


# ------------------------------------------------------------------- abstract data bases


def test_abstract_data_bases_are_not_data_choices() -> None:
    options = {p.stem for p in (REPO / "conf" / "data").glob("*.yaml")}
    assert options and not options & set(ABSTRACT_DATA)
    with initialize_config_dir(config_dir=str(medlite.CONF_DIR), version_base="1.3"):
        with pytest.raises(MissingConfigException) as err:
            compose(config_name="train", overrides=["data=medmnist"])
        listed = str(err.value)
        assert "breastmnist" in listed and "synthetic" in listed
        assert not any(f"\t{name}\n" in listed + "\n" for name in ABSTRACT_DATA), listed
        # the options still get what the bases give them
        cfg = compose(config_name="train", overrides=["data=breastmnist"])
        assert cfg.data._target_.endswith("MedMNISTSource") and "augment" in cfg.data
        volume = compose(config_name="train", overrides=["data=organmnist3d"])
        assert volume.data.flag == "organmnist3d" and volume.model.name == "mobilenetv2_3d"


def test_train_help_lists_no_abstract_data_option() -> None:
    proc = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("data: "))
    choices = line.removeprefix("data: ").split(", ")
    assert "breastmnist" in choices and not set(choices) & set(ABSTRACT_DATA)


# ------------------------------------------------------------------ load_from_checkpoint


@pytest.fixture
def tiny_run(tmp_path: Path) -> tuple[Path, dict, list[str]]:
    """A two-epoch run on the embedded synthetic dataset: its folder, results and overrides."""
    from medlite.pipeline import run

    out = tmp_path / "run"
    overrides = ["debug=limit", "callbacks=none", "profile.enabled=false"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(make_cfg(out, overrides))
    finally:
        torch.set_num_threads(before)
    return out, json.loads((out / "results.json").read_text()), overrides


def test_load_from_checkpoint_rebuilds_the_module(tiny_run, one_thread) -> None:
    from medlite.build import build_datamodule
    from medlite.modules import CNNModule, MedliteModule

    out, results, overrides = tiny_run
    ckpt = out / results["best_checkpoint"]
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["model_spec"]["config"]["name"] == "litecnn"
    for cls in (MedliteModule, CNNModule):
        module = cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        assert type(module) is cls and module.task.type == results["task"]["type"]
    # the rebuilt module scores the test split as the run did (same limited batches)
    dm = build_datamodule(make_cfg(out.parent / "again", overrides))
    trainer = pl.Trainer(
        accelerator="cpu",
        limit_test_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(module, datamodule=dm, verbose=False)
    assert module.metrics["test"]["auc"] == pytest.approx(results["test"]["auc"], abs=1e-6)


def test_a_reshaped_network_is_not_rebuilt_from_its_config(one_thread) -> None:
    """A pruned or factorised network no longer matches its config: its checkpoint says so
    instead of rebuilding the wrong shapes."""
    from medlite.build import build_model
    from medlite.modules import CNNModule
    from medlite.tasks import BINARY, ClassificationTask

    cfg = make_cfg(Path("unused"))
    net = build_model(cfg.model, 2, 1, 28)
    task = ClassificationTask(type=BINARY, labels=("benign", "malignant"))
    assert CNNModule(net, task, optim={"lr": 1e-3}).hparams["model_spec"] is not None
    net.extra = torch.nn.Linear(3, 3)  # stands for a layer a compression step replaced
    module = CNNModule(net, task, optim={"lr": 1e-3})
    assert module.hparams["model_spec"] is None
    with pytest.raises(ConfigError, match="compressed/model.pt"):
        CNNModule(**module.hparams)


# ---------------------------------------------------------------------------- matplotlib


def test_plots_leave_the_matplotlib_backend_alone(tmp_path: Path, monkeypatch) -> None:
    """Library plots draw on their own Figure: the caller's backend (a notebook's inline one)
    is never switched, and ``matplotlib.use`` is never called."""
    import matplotlib
    import optuna

    from medlite.deploy.benchmark import plot_latency
    from medlite.deploy.model_card import plot_roc, plot_segmentation_examples
    from medlite.sweeps.optuna import Objective, _plot_history
    from medlite.tasks import BINARY, ClassificationTask

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # not Agg, so that a switch to Agg would show
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("matplotlib.use called"))
    try:
        rows = [
            {"runtime": rt, "threads": t, "latency_ms": 2.0 * t, "latency_p90_ms": 2.5 * t}
            for rt in ("pytorch", "onnx_fp32")
            for t in (1, 2)
        ]
        plot_latency({"model": "litecnn", "rows": rows}, tmp_path / "latency.png")
        task = ClassificationTask(type=BINARY, labels=("benign", "malignant"))
        labels = np.array([0, 1, 0, 1, 1, 0])
        scores = np.stack([1 - np.linspace(0.1, 0.9, 6), np.linspace(0.1, 0.9, 6)], axis=1)
        plot_roc(labels, {"pytorch": scores}, task, tmp_path / "roc.png")
        image = np.zeros((16, 16), np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 1
        plot_segmentation_examples(
            [image], [mask], [mask], ("background", "lesion"), ["a"], tmp_path / "seg.png"
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        objective = [Objective("optimized/value", "maximize")]
        _plot_history(study.trials, objective, study.best_trials, tmp_path / "history.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        monkeypatch.undo()
        matplotlib.use(before)
    for name in ("latency", "roc", "seg", "history"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


# -------------------------------------------------------------------- a non-editable install


def _copy_source(dest: Path) -> Path:
    """The project's source files (no build output, caches or runs), so building the wheel
    leaves nothing in the checkout."""
    skip = shutil.ignore_patterns(
        ".git", "outputs", "multirun", "build", "dist", "*.egg-info", "__pycache__", ".*cache",
        ".venv", ".benchmarks", "wandb", "lightning_logs", "*.ckpt", "*.npz", "*.npy", "*.onnx",
    )  # fmt: skip
    return Path(shutil.copytree(REPO, dest, ignore=skip))


def _venv(path: Path) -> Path:
    """A venv that sees this interpreter's packages (torch & co.) through a plain path entry,
    not as a site dir: the site dir's .pth files (an editable medlite's finder) stay out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    seen = [*site_module.getsitepackages(), sysconfig.get_path("purelib")]
    if site_module.ENABLE_USER_SITE:
        seen.append(site_module.getusersitepackages())
    (Path(site) / "_medlite_test_base.pth").write_text("".join(f"{d}\n" for d in seen))
    return python


@pytest.mark.slow
def test_wheel_install_works_from_any_directory(tmp_path: Path) -> None:
    """``pip install .`` (not editable) into a fresh venv: configs, the Optuna plugin, console
    scripts and ``python -m medlite`` all come from the installed wheel, away from the clone."""
    source = _copy_source(tmp_path / "source")
    python = _venv(tmp_path / "venv")
    bin_dir = python.parent
    env = subprocess_env(tmp_path) | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    install += ["--no-index", "--ignore-installed", str(source)]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    shutil.rmtree(source)  # nothing may still come from the source tree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600
        )

    where = run(
        str(python),
        "-c",
        "import medlite, hydra_plugins.medlite as p; from hydra.core.plugins import Plugins\n"
        "Plugins.instance().class_name_to_class['hydra_plugins.medlite.OptunaSweeper']\n"
        "print(medlite.__file__); print(medlite.CONF_DIR); print(p.__file__)",
    )
    assert where.returncode == 0, where.stderr[-2000:]
    venv = str(tmp_path / "venv")
    assert all(line.startswith(venv) for line in where.stdout.split()), where.stdout
    assert where.stdout.split()[1].endswith("medlite/conf")

    helped = run(str(bin_dir / "medlite-train"), "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "train is powered by Hydra" in helped.stdout and "breastmnist" in helped.stdout
    for script in ("medlite-export", "medlite-benchmark", "medlite-predict"):
        proc = run(str(bin_dir / script), "--help")
        assert proc.returncode == 0 and "run" in proc.stdout, (script, proc.stderr[-2000:])
    assert run(str(python), "-m", "medlite").returncode == 2  # no command: usage, failure

    out = tmp_path / "run"
    trained = run(
        str(python), "-m", "medlite", "train", "debug=limit", "callbacks=none",
        "profile.enabled=false", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["status"] == "ok"
    assert (out / "train.log").exists()
    assert not (elsewhere / "outputs").exists()  # hydra.run.dir held the run


@pytest.mark.slow
def test_ddp_processes_restart_python_m_medlite_train(tmp_path: Path) -> None:
    """Lightning's DDP launcher starts the other processes again from ``sys.argv``: under
    ``python -m medlite train`` they must get the ``train`` command back."""
    cmd = [
        sys.executable, "-m", "medlite", "train", "trainer=ddp", "trainer.devices=2",
        "debug=limit", "callbacks=none", f"paths.log_dir={tmp_path / 'outputs'}",
    ]  # fmt: skip
    env = subprocess_env(tmp_path)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "outputs").rglob("results.json")
    assert json.loads(results.read_text())["job"]["world_size"] == 2
    assert "MEMBER: 2/2" in (results.parent / "train_ddp_process_1.log").read_text()
