"""A cached teacher is the teacher you asked for: the cache key covers the fully resolved
teacher-training config (epochs, batch caps, debug settings, trainer, callbacks...), a teacher
trained under debug caps is never cached, and results.json records the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from medlite.build import build_datamodule
from medlite.checkpoints import save_weights
from medlite.compress.teacher import _cache_key, cache_path, debug_caps, plan_teacher
from medlite.pipeline import run
from tests.helpers import make_cfg

KD = ["compress=kd"]
#: a tiny teacher and student, so whole runs stay quick
TINY_TEACHER = [
    "teacher.arch=litecnn",
    "teacher.name=litecnn",
    "~teacher.kwargs.widen_factor",
    "+teacher.kwargs.widths=[8,8,16,16]",
    "+teacher.kwargs.depths=[1,1,1]",
    "+teacher.kwargs.head_dim=32",
    "model.kwargs.widths=[8,8,16,16]",
    "model.kwargs.depths=[1,1,1]",
    "model.kwargs.head_dim=32",
]


def _key(tmp_path: Path, overrides: list[str]) -> str:
    return _cache_key(make_cfg(tmp_path / "run", [*KD, *overrides]), "data-id")


def test_key_changes_with_epochs_caps_and_debug_settings(tmp_path: Path) -> None:
    changes = [
        ["trainer.max_epochs=3"],
        ["teacher.epochs=2"],
        ["max_phase_epochs=1"],
        ["+trainer.limit_train_batches=3"],
        ["+trainer.limit_val_batches=0.5"],
        ["debug=limit"],
        ["debug=fast_dev_run"],
        ["debug=overfit"],
        ["trainer.gradient_clip_val=1.0"],
        ["trainer.precision=bf16-mixed"],
        ["+trainer.accumulate_grad_batches=2"],
        ["loss.class_weights=auto"],
        ["optim.lr=0.01"],
        ["seed=7"],
        [
            "+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
            "+callbacks.stop.monitor=val/auc",
        ],
    ]
    base = _key(tmp_path, [])
    keys = [_key(tmp_path, c) for c in changes]
    assert base not in keys
    assert len(set(keys)) == len(keys), "two different teacher recipes share a cache key"


def test_key_ignores_what_does_not_change_the_weights(tmp_path: Path) -> None:
    base = _key(tmp_path, [])
    same = [
        ["callbacks=none"],  # progress bar and learning-rate logging only
        ["trainer.log_every_n_steps=1"],
        ["trainer.devices=[1]"],  # a multirun job pinned to its GPU: still one device
        ["data.num_workers=2"],
        ["teacher.ckpt_path=null", "teacher.cache=true"],
    ]
    for overrides in same:
        assert _key(tmp_path, overrides) == base, overrides


def test_debug_caps_are_named(tmp_path: Path) -> None:
    cfg = lambda o: make_cfg(tmp_path / "run", [*KD, *o])  # noqa: E731
    assert debug_caps(cfg([])) == []
    assert debug_caps(cfg(["trainer.max_epochs=1"])) == []  # a short run, not a capped one
    assert "trainer.limit_train_batches=3" in debug_caps(cfg(["debug=limit"]))
    assert "max_phase_epochs=2" in debug_caps(cfg(["debug=limit"]))
    assert debug_caps(cfg(["debug=fast_dev_run"])) == ["trainer.fast_dev_run=True"]
    assert debug_caps(cfg(["debug=overfit"])) == ["trainer.overfit_batches=2"]
    assert debug_caps(cfg(["+trainer.limit_train_batches=1"])) == ["trainer.limit_train_batches=1"]
    assert debug_caps(cfg(["+trainer.limit_train_batches=1.0"])) == []  # 1.0: every batch


def _plan(tmp_path: Path, overrides: list[str]):
    cfg = make_cfg(
        tmp_path / "plan", [*KD, *TINY_TEACHER, f"paths.cache_dir={tmp_path}/cache", *overrides]
    )
    dm = build_datamodule(cfg)
    dm.setup()
    return cfg, dm, plan_teacher(cfg, dm)


def test_a_cached_teacher_is_found_only_by_its_own_recipe(tmp_path: Path) -> None:
    cfg, dm, plan = _plan(tmp_path, [])
    assert plan.source == "train" and plan.path is not None and plan.key
    save_weights(nn.Linear(1, 1), plan.path, {"arch": "litecnn"})  # as a finished run caches it
    assert _plan(tmp_path, [])[2].source == "cache"
    assert _plan(tmp_path, ["trainer.max_epochs=30"])[2].source == "train"
    debug = _plan(tmp_path, ["debug=limit"])[2]
    assert debug.source == "train" and debug.path is None and "debug caps" in debug.not_cached


def test_a_debug_trained_teacher_is_never_cached_nor_reused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "debug_run"
    overrides = [
        *KD,
        *TINY_TEACHER,
        "debug=limit",  # the case: a teacher trained on 3 batches
        "callbacks=none",
        "profile.enabled=false",
        f"paths.cache_dir={cache}",
    ]
    run(make_cfg(out, overrides))
    info = json.loads((out / "results.json").read_text())["compression"]["teacher"]
    assert info["source"] == "train" and "cached" not in info
    assert info["cache_key"] and "trainer.limit_train_batches=3" in info["not_cached"]
    assert not list(cache.glob("teachers/**/*.ckpt"))
    # even a file left under the debug recipe's key (as older medlite cached it) is not used:
    # not by the next debug run, and not by a full run, whose key differs
    cfg, dm, _ = _plan(tmp_path, ["debug=limit"])
    stale = cache_path(cfg, dm.name, dm.fingerprint(), dm.size)
    stale.parent.mkdir(parents=True)
    stale.write_bytes((out / "teacher" / "teacher.ckpt").read_bytes())
    assert _plan(tmp_path, ["debug=limit"])[2].source == "train"
    full = _plan(tmp_path, [])[2]
    assert full.source == "train" and full.path != stale and full.key != info["cache_key"]


def test_a_full_teacher_is_cached_and_reused_with_its_key(tmp_path: Path) -> None:
    common = [
        *KD,
        *TINY_TEACHER,
        "callbacks=none",
        "profile.enabled=false",
        "trainer.max_epochs=1",
        "compress.steps.0.epochs=1",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    first, second = tmp_path / "a", tmp_path / "b"
    run(make_cfg(first, common))
    run(make_cfg(second, common))
    a = json.loads((first / "results.json").read_text())["compression"]["teacher"]
    b = json.loads((second / "results.json").read_text())["compression"]["teacher"]
    assert a["source"] == "train" and Path(a["cached"]).is_file() and a["cache_key"] in a["cached"]
    assert b["source"] == "cache" and b["cache_key"] == a["cache_key"]
    assert b["test"] == pytest.approx(a["test"])
