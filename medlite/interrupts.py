"""Stopping a run on a signal: Ctrl-C, a scheduler's SIGTERM, SLURM's pre-emption warning.

Left to Lightning, SIGTERM ends a fit at the next batch end with a ``SystemExit`` carrying no
code (the process exits 0, so schedulers and wrappers count the run a success), and only
inside ``fit`` (data loading, testing, profiling and export are killed outright or not at
all); a process started in the background by a script inherits SIGINT *ignored*, so Ctrl-C or
``kill -INT`` never reaches it. medlite installs its own handlers for the whole run instead:

- the signal raises :class:`RunInterrupted` at once, in the main thread, at the next Python
  instruction (a native call in progress, e.g. one scan kernel call, finishes first); a repeat
  within a few seconds is ignored while the stop is recorded;
- the pipeline records ``status: failed`` in results.json; checkpoints are written atomically
  (:mod:`medlite.checkpoint_io`), so ``checkpoints/last.ckpt`` is the last complete epoch's;
- the process exits ``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM), skipping the
  interpreter's teardown of torch and Lightning (2-5 s on a busy machine; ``medlite.cli``).

Under SLURM (``SLURM_JOB_ID`` set) SIGUSR1/SIGUSR2 (the warning ``sbatch --signal`` or submitit
sends before a time limit or pre-emption) stop the run the same way, and SIGTERM, SIGUSR1 or
SIGUSR2 then **requeue** the job (``scontrol requeue <job id>``) when the run can be resumed
(``checkpoints/last.ckpt`` and no compression recipe). A marker in
``<paths.log_dir>/.requeue/<job id>.json`` names the run; when SLURM starts the job again
(``SLURM_RESTART_COUNT`` > 0), the same command continues that run as ``resume=<run dir>``
would. ``requeue_on_preemption=false`` turns this off.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from medlite.signal_stack import disable_dangling_altstack

#: signals that stop a run anywhere
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: the pre-emption / time-limit warnings of SLURM jobs (``--signal=USR1@90``; submitit: USR2)
SLURM_WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)


class RunInterrupted(BaseException):  # noqa: N818 - named for what happened, like KeyboardInterrupt
    """A signal stopped the run. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way (a sweep's "record and go on") swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal."""
        return 128 + self.signum


def slurm_job_id() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for an array task); None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def handled_signals() -> tuple[signal.Signals, ...]:
    return STOP_SIGNALS + (SLURM_WARNINGS if slurm_job_id() else ())


#: a repeated signal this soon after the first is ignored: the stop is under way (it takes
#: about a second) and must get to write its record; later ones raise again
REPEAT_GRACE_S = 5.0
_first_signal: list[float] = []


def _raise(signum: int, frame) -> None:
    now = time.monotonic()
    if _first_signal and now - _first_signal[0] < REPEAT_GRACE_S:
        return
    _first_signal[:] = [now]
    raise RunInterrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, :func:`handled_signals` raise :class:`RunInterrupted` (a repeat
    within :data:`REPEAT_GRACE_S` is ignored, so that a second Ctrl-C does not cut the
    recording of the first). Only the main thread can set handlers; elsewhere (a launcher's
    worker thread) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _first_signal.clear()
    disable_dangling_altstack()  # else a signal after an OpenVINO export crashes the process
    previous = {s: signal.signal(s, _raise) for s in handled_signals()}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


# --- SLURM requeue ------------------------------------------------------------------------


def _marker(log_dir: Path, job_id: str) -> Path:
    return Path(log_dir) / ".requeue" / f"{job_id}.json"


def resumable(run_dir: Path, compress: str | None) -> str | None:
    """Why ``run_dir`` can't be continued with ``resume=`` (None when it can)."""
    if compress not in (None, "none"):
        return f"runs with a compression recipe (compress={compress}) can't be resumed"
    if not (Path(run_dir) / "checkpoints" / "last.ckpt").is_file():
        return "it stopped before its first epoch ended (no checkpoints/last.ckpt)"
    return None


def requeue(run_dir: Path, log_dir: Path, job_id: str, signum: int) -> tuple[bool, str]:
    """Leave the marker that sends the restarted job to ``run_dir`` and ask SLURM to requeue
    the job; returns (requeued, what happened in one sentence)."""
    marker = _marker(log_dir, job_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "run_dir": str(Path(run_dir).resolve()),
        "signal": signal.Signals(signum).name,
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    marker.write_text(json.dumps(record, indent=2))
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        marker.unlink(missing_ok=True)
        return False, f"could not requeue SLURM job {job_id} (scontrol: {err})"
    if done.returncode != 0:
        marker.unlink(missing_ok=True)
        why = (done.stderr or done.stdout).strip().splitlines()
        return False, f"scontrol requeue {job_id} failed: {why[-1] if why else done.returncode}"
    return True, f"requeued SLURM job {job_id}; when it restarts it continues {run_dir}"


def requeued_run(log_dir: Path) -> Path | None:
    """The run a requeued SLURM job must continue (its marker), or None: not under SLURM, not
    a restart (``SLURM_RESTART_COUNT`` unset or 0), or no marker for this job."""
    job_id = slurm_job_id()
    if not job_id or int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0) < 1:
        return None
    marker = _marker(log_dir, job_id)
    try:
        return Path(json.loads(marker.read_text())["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget_requeue(log_dir: Path) -> None:
    """The requeued run ended (finished, or failed for good): its marker goes."""
    job_id = slurm_job_id()
    if job_id:
        _marker(log_dir, job_id).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            _marker(log_dir, job_id).parent.rmdir()  # only if empty
