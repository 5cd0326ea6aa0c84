"""Faults of the process and the command line: signals, exit statuses, run folders, and config
mistakes caught before the heavy imports (issue 18, part 2). Most tests run the real
``train.py`` in a subprocess on the embedded synthetic data."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl

from medlite.errors import ConfigError
from medlite.run_dirs import claim
from tests.helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
#: a long run of short epochs (3 batches): there is always a checkpoint to keep and an epoch
#: in progress when the signal comes
LONG = [
    "debug=limit",
    "callbacks=none",
    "profile.enabled=false",
    "trainer.max_epochs=500",
    "max_phase_epochs=500",
]


def _train_py(
    root: Path, args: list[str], env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env or subprocess_env(root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _results(log_dir: Path) -> list[Path]:
    return sorted(log_dir.rglob("results.json"))


# --------------------------------------------------------------------------- config mistakes
def test_config_checks_import_no_heavy_stack() -> None:
    """What the command line runs before validating (Hydra's callbacks, the CLI, the checks)
    imports neither torch nor Lightning, timm or MONAI: a config mistake fails in about a
    second. The +key check reads the Trainer's arguments from its source."""
    code = (
        "import sys\n"
        "from omegaconf import OmegaConf\n"
        "import medlite.cli, medlite.run_dirs, medlite.sweeps.summary\n"
        "from medlite.config import check_trainer_keys\n"
        "from medlite.errors import ConfigError\n"
        "cfg = OmegaConf.create({'trainer': {'_target_': 'pytorch_lightning.Trainer',"
        " 'max_epochs': 3, 'max_epoch': 3}})\n"
        "try:\n"
        "    check_trainer_keys(cfg)\n"
        "except ConfigError as err:\n"
        "    print(err)\n"
        "print(sorted(m for m in ('torch', 'pytorch_lightning', 'timm', 'monai')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = _lines(done.stdout)
    assert "trainer.max_epoch is not an argument" in out[0] and "max_epochs" in out[0]
    assert out[-1] == "[]", f"heavy modules imported before validation: {out[-1]}"


def test_paradigms_of_the_checks_match_the_registry() -> None:
    from medlite.config import PARADIGMS
    from medlite.models.registry import PARADIGMS as REGISTERED

    assert PARADIGMS == REGISTERED


def test_a_plus_typo_fails_before_data_loading_and_leaves_no_folder(tmp_path: Path) -> None:
    """Hydra's hint turns `trainer.max_epoch=3` into `+trainer.max_epoch=3`: caught by the
    config checks (no data generated into the fresh cache), one message, no run folder."""
    log_dir = tmp_path / "outputs"
    start = time.monotonic()
    done = _train_py(tmp_path, ["+trainer.max_epoch=3", f"paths.log_dir={log_dir}"])
    took = time.monotonic() - start
    assert done.returncode == 1, done.stderr[-2000:]
    assert "trainer.max_epoch is not an argument" in done.stderr
    assert "did you mean trainer.max_epochs" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists(), "data was loaded before the config was checked"
    assert not log_dir.exists() or not any(log_dir.iterdir())
    assert took < 60, f"a config mistake took {took:.0f} s"  # ~1-2 s; a loaded machine


# --------------------------------------------------------------------------- run folders
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    """The run folder is claimed with exclusive mkdirs: eight runs given the same name at the
    same time get eight folders (the name, then _2, _3, ...), each with its .hydra."""
    path = tmp_path / "runs" / "seed42_2026-01-01_12-00-00"
    got: list[Path] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        got.append(claim(path, given=False))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and path in got
    assert {p.name for p in got} == {path.name, *(f"{path.name}_{n}" for n in range(2, 9))}
    assert all((p / ".hydra").is_dir() for p in got)


def test_a_named_run_folder_must_be_new_or_empty(tmp_path: Path) -> None:
    empty, used = tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    (used / "checkpoints").mkdir(parents=True)
    assert claim(empty, given=True) == empty
    with pytest.raises(ConfigError, match="already holds files"):
        claim(empty, given=True)  # now ours: a second run may not share it
    with pytest.raises(ConfigError, match="already holds files.*resume="):
        claim(used, given=True)
    assert sorted(p.name for p in used.iterdir()) == ["checkpoints"]  # nothing written into it


def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    """A file in the way, /proc, a folder holding another run: one line, exit 1, no
    traceback, nothing created."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    used = tmp_path / "used"
    used.mkdir()
    (used / "results.json").write_text("{}")
    cases = {
        f"{blocker}/run": "a file is in the way",
        "/proc/medlite_run": "can't be created",
        str(used): "already holds files",
    }
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        cases[f"{locked}/run"] = "Permission denied"
    for run_dir, needle in cases.items():
        done = _train_py(tmp_path, [f"hydra.run.dir={run_dir}"], timeout=120)
        assert done.returncode == 1, (run_dir, done.stderr[-2000:])
        assert len(_lines(done.stderr)) == 1, (run_dir, done.stderr)
        assert needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in used.iterdir()) == ["results.json"]


# --------------------------------------------------------------------------- multiruns
def test_a_sweep_hydra_rejects_leaves_nothing(tmp_path: Path) -> None:
    log_dir = tmp_path / "outputs"
    done = _train_py(tmp_path, ["-m", "model=nosuchmodel,litecnn", f"paths.log_dir={log_dir}"])
    assert done.returncode == 1
    assert "nosuchmodel" in done.stderr
    assert not list(log_dir.rglob("*")), "a rejected sweep left files or folders"


@pytest.mark.slow
def test_a_multirun_with_a_failing_job_exits_non_zero(tmp_path: Path) -> None:
    """The failing job (optim.lr=0) does not stop the other, the summary is written, and the
    command exits 1 so that schedulers and CI see the failure."""
    sweep = tmp_path / "sweep"
    args = ["-m", "debug=fast_dev_run", "callbacks=none", "profile.enabled=false"]
    done = _train_py(tmp_path, [*args, "optim.lr=0,0.001", f"hydra.sweep.dir={sweep}"])
    assert done.returncode == 1, done.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert (summary["n_ok"], summary["n_failed"]) == (1, 1)
    assert "1 of 2 job(s) succeeded" in " ".join(done.stdout.split())


# --------------------------------------------------------------------------- signals
def _ignore_sigint() -> None:
    """As a script's background job starts (`train.py &`): SIGINT inherited as ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """One cache (the generated synthetic data) for this module's training runs."""
    return tmp_path_factory.mktemp("cli_faults_cache")


def _start(root: Path, args: list[str], cache: Path, env: dict | None = None) -> subprocess.Popen:
    """train.py in the background, its output in ``root/stderr.txt`` (a pipe nobody reads
    while the test waits could fill up and stall the run)."""
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=subprocess_env(root) | {"MEDLITE_CACHE_DIR": str(cache)} | (env or {}),
        stdout=subprocess.DEVNULL,
        stderr=(root / "stderr.txt").open("w"),
        preexec_fn=_ignore_sigint,
    )


def _wait_for(path_glob, proc: subprocess.Popen, root: Path, timeout: float = 240) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = path_glob()
        if found:
            return found[0]
        if proc.poll() is not None:
            err = (root / "stderr.txt").read_text()
            raise AssertionError(f"the run ended early: {err[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no checkpoint within the timeout")


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_stops_training_within_seconds(
    tmp_path: Path, data_cache: Path, sig: signal.Signals
) -> None:
    """Sent while training (after the first epoch's checkpoint), SIGTERM or SIGINT (even one
    inherited as ignored) ends the run within seconds with exit status 128 + signal,
    results.json status failed, and checkpoints/last.ckpt intact (typically < 1 s here)."""
    log_dir = tmp_path / "outputs"
    proc = _start(tmp_path, [*LONG, f"paths.log_dir={log_dir}"], data_cache)
    ckpt = _wait_for(lambda: sorted(log_dir.rglob("last.ckpt")), proc, tmp_path)
    time.sleep(0.5)  # into the next epoch
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{sig.name} did not end the run within 60 s") from None
    took = time.monotonic() - sent
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert took < 30, f"{sig.name} took {took:.1f} s to end the run"
    run_dir = ckpt.parent.parent
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and sig.name in results["error"]
    assert f"resume={run_dir}" in " ".join(err.split()) and "Traceback" not in err
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # complete, loadable
    assert state["epoch"] >= 0 and state["state_dict"]


class SignalAt(pl.Callback):
    """Test-only: the process signals itself, as a scheduler or Ctrl-C would, after
    ``batches`` batches of epoch ``epoch``."""

    sent: float | None = None

    def __init__(self, epoch: int, batches: int, signum: int) -> None:
        self.epoch, self.batches, self.signum = epoch, batches, int(signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx + 1 == self.batches:
            SignalAt.sent = time.monotonic()
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_is_recorded_and_gives_its_exit_status(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """In-process, with SIGINT inherited as ignored: the signal stops the fit mid-epoch at
    once, results.json says failed (naming the signal), the previous epoch's last.ckpt is
    kept, the exit status is 128 + signal, and the process's handlers are restored."""
    from medlite.cli import train
    from tests.helpers import make_cfg

    out = tmp_path / "run"
    stop = "+callbacks.stop={_target_: tests.test_cli_faults.SignalAt, epoch: 1, batches: 2, "
    stop += f"signum: {int(sig)}}}"
    cfg = make_cfg(out, ["debug=limit", "callbacks=none", "profile.enabled=false", stop])
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as exit_:
            train(cfg)
        stopped = time.monotonic()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # handlers restored
    finally:
        signal.signal(signal.SIGINT, before)
    assert exit_.value.code == 128 + sig
    assert stopped - SignalAt.sent < 10  # typically ~0.1 s
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and sig.name in results["error"]
    import torch

    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0  # the last complete epoch's


@pytest.mark.slow
def test_slurm_preemption_requeues_and_the_restart_continues_the_run(
    tmp_path: Path, data_cache: Path
) -> None:
    """Under SLURM (SLURM_JOB_ID set), the pre-emption warning (SIGUSR1) stops the run,
    `scontrol requeue <job>` is called (a stand-in on PATH records it), and the same command,
    started again by SLURM (SLURM_RESTART_COUNT=1), continues the run in its own folder."""
    import torch
    from omegaconf import OmegaConf

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    log_dir = tmp_path / "outputs"
    slurm = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    args = [*LONG, f"paths.log_dir={log_dir}"]

    proc = _start(tmp_path, args, data_cache, slurm)
    ckpt = _wait_for(lambda: sorted(log_dir.rglob("last.ckpt")), proc, tmp_path)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 128 + signal.SIGUSR1
    err = " ".join((tmp_path / "stderr.txt").read_text().split())
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in err
    run_dir = ckpt.parent.parent
    assert _results(log_dir) == [run_dir / "results.json"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"
    # two more epochs, not 500, for the restart to train
    epoch = torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"]
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    saved.trainer.max_epochs = saved.max_phase_epochs = epoch + 3
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")

    env = subprocess_env(tmp_path) | slurm | {"MEDLITE_CACHE_DIR": str(data_cache)}
    again = _train_py(tmp_path, args, env=env | {"SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert _results(log_dir) == [run_dir / "results.json"], "the restart made a folder"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and [r["epoch"] for r in results["resumed"]] == [epoch]
    assert not (log_dir / ".requeue").exists()  # the marker goes once the run ended
    assert calls.read_text().split() == ["requeue", "4242"]  # no second requeue
