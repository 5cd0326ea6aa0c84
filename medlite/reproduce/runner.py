"""Running recipes: each (recipe, seed) is one ``train`` run in its own process and folder.

A run that finished (``results.json`` with status ok, started with the same overrides, and whose
config still composes the same) is reused, never retrained, so an interrupted reproduction continues where it stopped. Any other folder left
at a run's place is moved aside (``<seed>.attempt<k>``), not deleted: its logs may explain a
failure. A run that fails is a record with its error, and the other runs go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from medlite.atomic import write_text
from medlite.reproduce.recipes import Recipe
from medlite.results import read_json_object

#: what a run folder records of how it was started (compared before reusing it)
LAUNCH_FILE = "reproduce.json"
#: the budget of --quick: epochs per run (schedules scale: milestones are fractions)
QUICK_EPOCHS = 5


@dataclass
class RunRecord:
    """One (recipe, seed): where it ran, whether it was reused, and its results.json."""

    recipe: Recipe
    seed: int
    run_dir: Path
    reused: bool = False
    results: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.results.get("status") == "ok"


def budget_overrides(quick: bool, extra: Sequence[str] = ()) -> list[str]:
    """The overrides a reproduction adds to every recipe: the quick budget and the user's own."""
    return [*([f"trainer.max_epochs={QUICK_EPOCHS}"] if quick else []), *extra]


def finished(run_dir: Path, launch: dict) -> dict | None:
    """The results of a finished run started the same way, or None."""
    results = read_json_object(run_dir / "results.json")
    if results.get("status") != "ok":
        return None
    return results if read_json_object(run_dir / LAUNCH_FILE) == launch else None


def _move_aside(run_dir: Path) -> None:
    k = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.attempt{k}")).exists():
        k += 1
    shutil.move(str(run_dir), str(aside))


def command(recipe: Recipe, seed: int, run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """``python -m medlite train experiment=<recipe> seed=<s> ...`` into ``run_dir``."""
    return [
        sys.executable,
        "-m",
        "medlite",
        "train",
        f"experiment={recipe.experiment}",
        f"seed={seed}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


#: config keys that say where things go or how they are shown, not what is trained
_NOT_RECIPE = ("paths", "hydra", "logger", "show_traceback", "threads", "parallel_jobs")


def config_fingerprint(recipe: Recipe, seed: int, overrides: Sequence[str]) -> str | None:
    """A hash of the run's composed config (unresolved, so no paths or machine leak in), minus
    where outputs go: a finished run is reused only if the recipe, the defaults it inherits
    (e.g. the default distillation teacher) and the overrides still compose to the same thing."""
    from hydra import compose, initialize_config_dir

    from medlite import CONF_DIR

    args = [f"experiment={recipe.experiment}", f"seed={seed}", *overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=args)
    except Exception:  # noqa: BLE001 - the run itself reports a config that does not compose
        return None
    tree = OmegaConf.to_container(cfg, resolve=False)
    kept = {k: v for k, v in tree.items() if k not in _NOT_RECIPE}
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_one(
    recipe: Recipe,
    seed: int,
    out: Path,
    overrides: Sequence[str],
    env: dict | None = None,
    fingerprint: str | None = None,
    train: bool = True,
) -> RunRecord | None:
    """Run (or reuse) one seed of one recipe; its output goes to ``<run dir>.log``. With
    ``train=False`` only reuse: None for a run that has not finished."""
    run_dir = out / "runs" / recipe.slug / f"seed{seed}"
    launch = {"recipe": recipe.id, "seed": seed, "overrides": list(overrides)}
    if fingerprint is not None:
        launch["config"] = fingerprint
    done = finished(run_dir, launch)
    if done is not None:
        return RunRecord(recipe, seed, run_dir, reused=True, results=done)
    if not train:
        return None
    if run_dir.exists():
        _move_aside(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)  # train claims the run folder itself
    log = run_dir.with_name(f"{run_dir.name}.log")
    start = time.time()
    with log.open("w") as f:
        proc = subprocess.run(
            command(recipe, seed, run_dir, overrides),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    results = read_json_object(run_dir / "results.json")
    if run_dir.is_dir():  # how it was started: a later reproduction reuses it only if the same
        write_text(run_dir / LAUNCH_FILE, json.dumps(launch, indent=2))
    record = RunRecord(recipe, seed, run_dir, results=results)
    if proc.returncode != 0 or not record.ok:
        record.error = results.get("error") or _last_error(log) or f"exit code {proc.returncode}"
        results.setdefault("wall_time_s", round(time.time() - start, 1))
    return record


def _last_error(log: Path) -> str | None:
    """The last line of a failed run's log that names an error (medlite prints one)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:500]
    return lines[-1][:500] if lines else None


def job_env(jobs: int) -> dict:
    """The environment of each run: threads split between parallel runs unless the user fixed
    them (on a small shared machine 1 thread per run is the fast choice)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    return env


def run_all(
    plan: Sequence[tuple[Recipe, int]],
    out: Path,
    overrides: Sequence[str],
    jobs: int = 1,
    on_done: Callable[[RunRecord], None] | None = None,
    train: bool = True,
) -> list[RunRecord]:
    """Every (recipe, seed) of ``plan``, ``jobs`` at a time; records in plan order. With
    ``train=False`` only the runs that already finished (a table while others still run)."""
    env = job_env(jobs)
    # composed here, one at a time: Hydra's global state is not for threads
    prints = {(r.id, s): config_fingerprint(r, s, overrides) for r, s in plan}

    def one(item: tuple[Recipe, int]) -> RunRecord | None:
        recipe, seed = item
        record = run_one(recipe, seed, out, overrides, env, prints[(recipe.id, seed)], train)
        if on_done is not None and record is not None:
            on_done(record)
        return record

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [r for r in pool.map(one, plan) if r is not None]
