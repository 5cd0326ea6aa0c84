"""The README's counts come from the code: its configuration table names every config group of
``conf/`` and every option of the small groups, and its model and dataset counts are those of the
config files (a new config that the README does not mention fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
README = (REPO / "README.md").read_text()
#: groups whose options the table counts or summarises instead of listing one by one
COUNTED = ("data", "model")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def _config_table() -> dict[str, str]:
    """``group -> its row`` from the "Configuration" section's table."""
    rows = re.findall(r"^\| `([a-z_]+)` \|(.*)\|$", _section("Configuration"), re.M)
    return dict(rows)


def _groups() -> list[str]:
    return sorted(
        p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _model_kinds() -> dict[tuple[str, int], list[str]]:
    """Model configs by (task, spatial dims), as medlite reads them (defaults: classification, 2)."""
    kinds: dict[tuple[str, int], list[str]] = {}
    for name in _options("model"):
        cfg = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text()) or {}
        key = (cfg.get("task") or "classification", int(cfg.get("dims") or 2))
        kinds.setdefault(key, []).append(name)
    return kinds


def _medmnist_flags(three_d: bool) -> list[str]:
    import medmnist

    return [f for f in _options("data") if f in medmnist.INFO and f.endswith("3d") == three_d]


def _count(row: str, pattern: str) -> int:
    found = re.search(pattern, row)
    assert found, f"{pattern!r} not in the README row {row!r}"
    return int(found.group(1))


def test_every_config_group_has_a_row() -> None:
    assert sorted(_config_table()) == _groups()


@pytest.mark.parametrize("group", [g for g in _groups() if g not in COUNTED])
def test_every_option_of_a_group_is_listed(group: str) -> None:
    row = _config_table()[group]
    missing = [o for o in _options(group) if f"`{o}`" not in row]
    assert not missing, f"README's `{group}` row lacks {missing}"


def test_model_counts_match_the_configs() -> None:
    row, kinds = _config_table()["model"], _model_kinds()
    assert _count(row, r"and (\d+) more classifiers") == len(kinds[("classification", 2)]) - 1
    assert _count(row, r"(\d+) segmentation networks") == len(kinds[("segmentation", 2)])
    assert _count(row, r"(\d+) volume classifiers") == len(kinds[("classification", 3)])
    taxonomy = _count(_section("Sweeps"), r"lists the (\d+) models of the zoo")
    assert taxonomy == len(kinds[("classification", 2)])


def test_dataset_counts_match_the_configs() -> None:
    row = _config_table()["data"]
    assert _count(row, r"the (\d+) MedMNIST flags") == len(_medmnist_flags(three_d=False))
    assert _count(row, r"the (\d+) MedMNIST 3D flags") == len(_medmnist_flags(three_d=True))
    others = [
        o for o in _options("data") if o not in _medmnist_flags(False) + _medmnist_flags(True)
    ]
    missing = [o for o in others if f"`{o}`" not in row]
    assert not missing, f"README's `data` row lacks {missing}"
