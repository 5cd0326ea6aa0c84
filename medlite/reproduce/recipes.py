"""Published experiments as recipes: the configs under ``conf/experiment/paper/`` and the numbers
of ``published.yaml`` they are judged against.

A recipe is a Hydra experiment config (``experiment=paper/<source>/<dataset>/<method>``) whose
``reproduce`` block states, machine-readably, what it reproduces (source, method, dataset), the
paper's protocol and how we deviate from it. A source of ``kind: claim`` (the review's
"compression keeps diagnostic performance") has no numbers: its recipes are compression runs,
judged against their own uncompressed model. Reading it needs no Hydra: the block is merged from
the recipe file and the protocol file its defaults list names, so ``--list`` is instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from medlite import CONF_DIR
from medlite.errors import ConfigError

#: recipes live in this config group folder (``experiment=paper/...``)
PAPER_DIR = CONF_DIR / "experiment" / "paper"
#: shared protocol files: included by recipes, never run on their own
PROTOCOL_DIR = "protocol"
PUBLISHED = Path(__file__).with_name("published.yaml")


@dataclass(frozen=True)
class Recipe:
    """One published experiment medlite can rerun."""

    id: str  # paper/<source>/<dataset>/<method>, the experiment= value
    source: str
    method: str
    dataset: str
    trials: int
    protocol: dict = field(default_factory=dict)
    deviations: tuple[str, ...] = ()

    @property
    def experiment(self) -> str:
        return self.id

    @property
    def slug(self) -> str:
        """A folder name for the recipe's runs."""
        return self.id.removeprefix("paper/").replace("/", "__")

    def published(self) -> dict:
        """The published numbers of this recipe (metric -> value) and how each was checked."""
        entry = published_results().get(self.source, {}).get(self.dataset, {}).get(self.method)
        if entry is None:
            raise ConfigError(
                f"{self.id}: no published numbers for {self.source}/{self.dataset}/{self.method} "
                f"in {PUBLISHED}"
            )
        return dict(entry)

    def method_title(self) -> str:
        return source_info(self.source).get("methods", {}).get(self.method, self.method)

    @property
    def is_claim(self) -> bool:
        """A claim (its source has ``kind: claim``) is judged against the uncompressed model of
        the same run, not against a published number."""
        return source_info(self.source).get("kind") == "claim"

    def metrics(self) -> list[str]:
        """The metrics this recipe is judged on: its published numbers', or its claim's."""
        entry = self.published()
        return (
            [str(m) for m in entry.get("metrics") or []]
            if self.is_claim
            else list(published_metrics(entry))
        )


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    return data if isinstance(data, dict) else {}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(out.get(key), dict) and isinstance(value, dict)
            else value
        )
    return out


def _reproduce_block(path: Path) -> dict:
    """The ``reproduce`` block of a recipe file, over those of the configs its defaults list
    includes from ``conf/experiment`` (the protocol)."""
    data = _load_yaml(path)
    block: dict = {}
    for entry in data.get("defaults") or []:
        if isinstance(entry, str) and entry.startswith("/experiment/"):
            included = CONF_DIR / f"{entry.lstrip('/')}.yaml"
            block = _merge(block, _reproduce_block(included))
    return _merge(block, data.get("reproduce") or {})


def discover(root: Path = PAPER_DIR) -> list[Recipe]:
    """Every recipe under ``conf/experiment/paper`` (protocol files excluded), sorted by id."""
    recipes = []
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root.parent).with_suffix("")
        if PROTOCOL_DIR in rel.parts:
            continue
        block = _reproduce_block(path)
        missing = [k for k in ("source", "method", "dataset") if not block.get(k)]
        if missing:
            raise ConfigError(f"recipe {path} has no reproduce.{', reproduce.'.join(missing)}")
        recipes.append(
            Recipe(
                id=rel.as_posix(),
                source=str(block["source"]),
                method=str(block["method"]),
                dataset=str(block["dataset"]),
                trials=int(block.get("trials") or 1),
                protocol=dict(block.get("protocol") or {}),
                deviations=tuple(block.get("deviations") or ()),
            )
        )
    return recipes


def select(pattern: str, recipes: list[Recipe] | None = None) -> list[Recipe]:
    """The recipes a command-line name means: one recipe (``medmnist_v2/breastmnist/resnet18_28``,
    ``paper/`` optional) or every recipe below a group (``medmnist_v2/breastmnist``)."""
    recipes = discover() if recipes is None else recipes
    name = pattern.strip().strip("/")
    name = name if name.startswith("paper/") else f"paper/{name}"
    chosen = [r for r in recipes if r.id == name or r.id.startswith(name + "/")]
    if not chosen:
        groups = sorted({r.id.rsplit("/", 2)[0].removeprefix("paper/") for r in recipes})
        raise ConfigError(
            f"no recipe or group {pattern!r}; groups: {', '.join(groups)} "
            "(python scripts/reproduce.py --list shows every recipe)"
        )
    return chosen


@cache
def _published() -> dict:
    return _load_yaml(PUBLISHED)


def published_results() -> dict:
    """``results`` of published.yaml: source -> dataset -> method -> {metric: value, check}."""
    return _published().get("results") or {}


def source_info(source: str) -> dict:
    """``sources.<source>`` of published.yaml: citation, table, metric definitions, tolerance."""
    return (_published().get("sources") or {}).get(source) or {}


def published_metrics(entry: dict) -> dict[str, float]:
    """The numeric metrics of a published entry (its ``check`` and notes left out)."""
    return {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
