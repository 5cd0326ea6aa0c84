"""medlite's Optuna sweeper as a Hydra plugin: ``hydra_plugins.medlite.OptunaSweeper``.

This folder installs as part of Hydra's ``hydra_plugins`` namespace package (see pyproject.toml),
where Hydra's plugin scan finds it, so ``hydra/sweeper=medlite_optuna`` (``sweep=optuna_*``)
resolves in any Hydra app, editable install or wheel, with nothing registered by hand. Hydra
instantiates only plugin classes defined in ``hydra_plugins``; the sweeper itself is
:class:`medlite.sweeps.optuna.OptunaSweeper`.
"""

from medlite.sweeps import optuna as _optuna


class OptunaSweeper(_optuna.OptunaSweeper):
    """Hydra's name for :class:`medlite.sweeps.optuna.OptunaSweeper`."""
