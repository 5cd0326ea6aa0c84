"""The paper recipes: each composes, and its machine-readable protocol is what the run really uses;
published.yaml has a checked number for every recipe and a recipe for every number."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from medlite import CONF_DIR
from medlite.errors import ConfigError
from medlite.reproduce import recipes as rc
from medlite.tasks import BINARY, ClassificationTask

ALL = rc.discover()
#: the MedMNIST v2 table's recipes (published numbers); the review's claims are checked below
RECIPES = [r for r in ALL if r.source == "medmnist_v2"]
CLAIMS = [r for r in ALL if r.is_claim]


@pytest.fixture(scope="module")
def composed() -> dict:
    """Every recipe's composed train config (Hydra, as ``train.py experiment=<id>`` builds it)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return {r.id: compose("train", overrides=[f"experiment={r.id}"]) for r in ALL}


def test_every_medmnist_v2_row_has_a_recipe() -> None:
    datasets = {
        "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
        "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
    }  # fmt: skip
    methods = {"resnet18_28", "resnet18_224", "resnet50_28", "resnet50_224"}
    ids = {r.id for r in RECIPES}
    assert ids == {f"paper/medmnist_v2/{d}/{m}" for d in datasets for m in methods}
    assert all(r.trials == 3 for r in RECIPES)  # "the mean of at least 3 trials"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.id.removeprefix("paper/"))
def test_protocol_is_what_the_run_uses(recipe: rc.Recipe, composed: dict) -> None:
    cfg, p = composed[recipe.id], recipe.protocol
    assert cfg.model.name == p["network"]
    assert (cfg.model.get("input_size") or cfg.data.size) == p["input_size"]
    assert (3 if cfg.data.as_rgb else 1) == p["channels"]
    assert cfg.optim.lr == p["lr"] and cfg.optim.weight_decay == p["weight_decay"]
    # Adam is stated; AdamW without weight decay is the same update (a listed deviation)
    assert p["optimiser"] == "adam" and cfg.optim._target_ == "torch.optim.AdamW"
    assert cfg.optim.weight_decay == 0 and any("AdamW" in d for d in recipe.deviations)
    assert cfg.scheduler.name == "multistep"
    assert list(cfg.scheduler.milestones) == p["milestones"] and cfg.scheduler.gamma == p["gamma"]
    assert cfg.scheduler.warmup == 0
    assert cfg.trainer.max_epochs == p["epochs"]
    assert cfg.data.batch_size == p["batch_size"]
    assert cfg.data.augment.enabled == p["augmentation"]
    assert cfg.data.name == recipe.dataset and cfg.reproduce.dataset == recipe.dataset
    if recipe.method in ("kd", "prune_kd_ptq"):  # the teacher is stated, not inherited
        assert cfg.teacher.name == p["teacher"] and cfg.teacher.members == p["teacher_members"]
    # the checkpoint kept is the best by the classification task's monitored metric
    assert cfg.eval.checkpoint == "best"
    assert ClassificationTask(BINARY, ("a", "b")).record()["monitor"] == p["checkpoint"]


def test_published_numbers_cover_every_recipe_and_nothing_else() -> None:
    for r in CLAIMS:  # a claim names its metrics and has no numbers
        entry = r.published()
        assert entry["metrics"] == ["auc", "acc"] and not rc.published_metrics(entry)
        assert entry["check"].startswith("claim") and r.metrics() == ["auc", "acc"]
    for r in RECIPES:
        entry = r.published()
        numbers = rc.published_metrics(entry)
        assert set(numbers) == {"auc", "acc"} and all(0 < v <= 1 for v in numbers.values())
        # every number says how it was checked: confirmed, unconfirmed or disputed, and by what
        assert entry["check"].startswith(("confirmed", "unconfirmed", "AUC ", "ACC "))
        assert any(w in entry["check"] for w in ("confirmed", "disputed"))
    listed = {
        (source, dataset, method)
        for source, by_dataset in rc.published_results().items()
        for dataset, by_method in by_dataset.items()
        for method in by_method
    }
    assert listed == {(r.source, r.dataset, r.method) for r in ALL}  # no orphan numbers


def test_every_source_states_its_provenance() -> None:
    for source in {r.source for r in RECIPES}:
        info = rc.source_info(source)
        for key in ("citation", "doi", "table", "code", "averaged_over", "tolerance"):
            assert info.get(key), (source, key)
        assert set(info["metrics"]) == {"auc", "acc"}  # each metric's definition
        assert set(info["methods"]) == {r.method for r in RECIPES if r.source == source}


def test_a_name_selects_a_recipe_or_a_group() -> None:
    one = rc.select("medmnist_v2/breastmnist/resnet18_28")
    assert [r.id for r in one] == ["paper/medmnist_v2/breastmnist/resnet18_28"]
    assert len(rc.select("paper/medmnist_v2/breastmnist")) == 4
    assert len(rc.select("medmnist_v2")) == 48
    with pytest.raises(ConfigError, match="no recipe or group 'medmnist_v2/breast'.*groups"):
        rc.select("medmnist_v2/breast")


def test_every_compression_family_has_a_claim_recipe() -> None:
    families = {"ptq", "qat", "prune", "kd", "lowrank", "prune_kd_ptq"}
    datasets = ("breastmnist", "retinamnist")
    assert {r.id for r in CLAIMS} == {
        f"paper/review/compression/{d}/{m}" for d in datasets for m in families
    }
    for d in datasets:
        group = {r.id for r in rc.select(f"review/compression/{d}")}
        assert group == {r.id for r in CLAIMS if r.dataset == d}
    assert all(r.trials == 3 and r.source == "review_compression" for r in CLAIMS)


@pytest.mark.parametrize("recipe", CLAIMS, ids=lambda r: r.id.removeprefix("paper/"))
def test_claim_protocol_is_what_the_run_uses(recipe: rc.Recipe, composed: dict) -> None:
    cfg, p = composed[recipe.id], recipe.protocol
    assert cfg.model.name == p["network"] == "litecnn"
    assert (cfg.model.get("input_size") or cfg.data.size) == p["input_size"]
    assert (3 if cfg.data.as_rgb else 1) == p["channels"]
    assert cfg.trainer.max_epochs == p["epochs"]
    assert cfg.compress.name == p["compress"] == recipe.method
    assert list(cfg.export.formats) == ["onnx_fp32", "onnx_int8"] and p["export"] == "onnx"
    assert cfg.data.name == recipe.dataset and cfg.reproduce.dataset == recipe.dataset


def test_the_claim_source_states_what_it_claims() -> None:
    info = rc.source_info("review_compression")
    assert info["kind"] == "claim" and info["tolerance"] == 0.01
    for key in ("citation", "claim", "baseline", "table", "averaged_over"):
        assert info.get(key), key
    assert set(info["metrics"]) == {"auc", "acc"}
    assert set(info["methods"]) == {r.method for r in CLAIMS}
