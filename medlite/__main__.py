"""``python -m medlite <command> [arguments]``: medlite's commands from any directory, in a clone
or an installed wheel; the ``medlite-<command>`` console scripts are the same functions."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def train(relaunch_argv: Sequence[str] | None = None) -> None:
    """``medlite-train``: train.py with the configs found beside the package (``conf/`` of a
    clone or ``medlite/conf`` of a wheel); Hydra reads the overrides from ``sys.argv``.
    ``relaunch_argv``: the command line that starts this command again, which Lightning's DDP
    launcher re-runs (from ``sys.argv``) for each further process; default: ``sys.argv``."""
    import hydra
    from omegaconf import DictConfig

    from medlite import CONF_DIR

    relaunch = list(sys.argv if relaunch_argv is None else relaunch_argv)

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def run(cfg: DictConfig) -> float | None:
        from medlite.cli import train as train_run

        sys.argv = list(relaunch)  # Hydra has parsed its arguments
        return train_run(cfg)

    run()


def export() -> int:
    """``medlite-export``: export a finished run (ONNX fp32/int8, torch.export) with parity checks."""
    from medlite.deploy.commands import main_export

    return main_export()


def benchmark() -> int:
    """``medlite-benchmark``: latency, throughput, memory and size of a run's model per runtime."""
    from medlite.deploy.commands import main_benchmark

    return main_benchmark()


def predict() -> int:
    """``medlite-predict``: local inference with a finished run on an image file or a folder."""
    from medlite.deploy.commands import main_predict

    return main_predict()


def reproduce() -> int:
    """``medlite-reproduce``: rerun published experiments over seeds, a table beside the paper."""
    from medlite.reproduce.cli import main as main_reproduce

    return main_reproduce()


USAGE = """usage: python -m medlite <command> [arguments]   (or medlite-<command> [arguments])

commands:
  train [overrides]                          train a run, or a sweep with -m (= python train.py)
  export run=<run dir>                       ONNX / torch.export files, checked on the test split
  benchmark run=<run dir>                    latency, throughput, memory and size per runtime
  predict run=<run dir> input=<file|folder>  local inference on your images (= python predict.py)
  reproduce <recipe or group> | --list       published experiments over seeds, beside the paper

<command> --help lists the command's arguments."""

COMMANDS: dict[str, Callable[[], int | None]] = {
    "train": train,
    "export": export,
    "benchmark": benchmark,
    "predict": predict,
    "reproduce": reproduce,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named first in ``argv`` with the rest as its own arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # each command reads its arguments from sys.argv, as its console script does; a DDP run
    # re-runs `python -m medlite train ...` for its other processes
    relaunch = [sys.argv[0], name, *rest]
    sys.argv = [f"medlite {name}", *rest]
    if name == "train":
        train(relaunch_argv=relaunch)
        return 0
    return COMMANDS[name]() or 0


if __name__ == "__main__":
    sys.exit(main())
