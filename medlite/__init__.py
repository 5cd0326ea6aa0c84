"""medlite."""

from pathlib import Path

from medlite import resolvers  # noqa: F401,E402  (config resolvers, needed before Hydra composes)


def _conf_dir() -> Path:
    """The Hydra configs: ``medlite/conf`` in an installed wheel (pyproject maps the top-level
    ``conf/`` there), else ``conf/`` beside this package in a clone or an editable install."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    return here.parent / "conf"  # a broken checkout: Hydra names the missing folder


#: where ``train.yaml`` and the config groups live (clone, editable or wheel install alike)
CONF_DIR = _conf_dir()
