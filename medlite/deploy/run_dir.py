"""A finished training run, read back from its directory: config, results and the trained model.

Export, benchmark, the model card and ``predict.py`` all start from a run directory, so they
share one reader: the input spec (size, channels, normalisation) comes from what the run
recorded, never from a second copy that could drift from training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from medlite.build import build_datamodule
from medlite.checkpoints import load_weights, run_file
from medlite.compress.structure import build_args, build_reference, load_compressed
from medlite.data.transforms import Preprocess
from medlite.errors import ConfigError
from medlite.tasks import Task, get_task

log = logging.getLogger(__name__)

#: where deployment writes its files inside a run directory
EXPORT_DIR = "export"


@dataclass
class TrainedRun:
    """What deployment needs from a run directory written by ``train.py``."""

    path: Path
    results: dict

    @classmethod
    def load(cls, path: str | Path) -> TrainedRun:
        """Read ``<path>/results.json``; a clear ConfigError if it is not a finished run."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"run directory {path} does not exist; pass run=<a folder under outputs/ "
                "that holds results.json>"
            )
        file = path / "results.json"
        if not file.is_file():
            raise ConfigError(
                f"{path} is not a medlite run directory (no results.json); pass the folder "
                "train.py printed at the end of a run"
            )
        try:
            results = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read {file}: {err}") from None
        if results.get("status") != "ok":
            raise ConfigError(
                f"run {path} did not finish (status {results.get('status')!r}"
                + (f": {results['error']}" if results.get("error") else "")
                + "); deploy a run that completed"
            )
        return cls(path=path, results=results)

    # ------------------------------------------------------------------ what the run recorded
    @cached_property
    def cfg(self) -> DictConfig:
        """The resolved config the run trained with."""
        return OmegaConf.create(self.results["config"])

    @property
    def data(self) -> dict:
        return self.results["data"]

    @cached_property
    def task(self) -> Task:
        return get_task(self.data["task"], self.data["labels"])

    @cached_property
    def preprocess(self) -> Preprocess:
        """The evaluation transform of training (resize/pad, channels, normalisation)."""
        spec = self.data["preprocess"]
        return Preprocess(
            spec["input_size"],
            spec["as_rgb"],
            spec["mean"],
            spec["std"],
            spec.get("fit", "resize"),
            load_size=spec.get("load_size"),
            spatial_dims=self.spatial_dims,
        )

    @property
    def in_chans(self) -> int:
        return len(self.data["preprocess"]["mean"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        size = int(self.data["preprocess"]["input_size"])
        return (self.in_chans,) + (size,) * self.spatial_dims

    @property
    def spatial_dims(self) -> int:
        """2 (images) or 3 (volumes); runs saved before volumes existed are 2D."""
        return int(self.data["preprocess"].get("spatial_dims", 2))

    @property
    def name(self) -> str:
        """``<model>-<data>-<compress>``, for titles and file names."""
        data = self.data.get("name") or self.data.get("flag")
        return f"{self.results['model']['name']}-{data}-{self.results['compress']['name']}"

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT_DIR

    @property
    def int8_onnx(self) -> Path | None:
        """The int8 file a compression recipe produced (ptq, qat, dynamic), if any."""
        saved = (self.results.get("compression") or {}).get("saved")
        path = self._local(saved) if saved else None
        return path if path is not None and path.suffix == ".onnx" and path.is_file() else None

    def _local(self, recorded: str) -> Path:
        """A path recorded in results.json, in this run folder (a moved or copied run uses its
        own files); one leading outside the run directory is refused (ConfigError)."""
        return run_file(recorded, self.path, self.results.get("run_dir"))

    # ------------------------------------------------------------------ the trained model
    def torch_model(self) -> nn.Module:
        """The final PyTorch model in eval mode on CPU.

        A compressed network (pruned, factorised, or the fp32 model an int8 file was made from)
        is rebuilt from its weights and structural record; otherwise the config's model gets the
        best checkpoint's weights. Every file is read weights-only: a run folder from someone
        else can't run code.
        """
        for name in ("compressed/model.pt", "compressed/model_fp32.pt"):
            file = self.path / name
            if file.is_file() or file.is_symlink():
                model = load_compressed(run_file(name, self.path))
                log.info("PyTorch model: %s", file)
                return model.eval()
        if (self.results.get("compression") or {}).get("steps"):
            log.warning(
                "run %s compressed its model but kept no PyTorch copy of it; using the best "
                "checkpoint of its first phase",
                self.path,
            )
        ckpt = self.results.get("best_checkpoint")
        if not ckpt:
            raise ConfigError(
                f"run {self.path} recorded no checkpoint (results.json best_checkpoint); "
                "deployment needs the trained weights"
            )
        ckpt_path = self._local(ckpt)
        if not ckpt_path.is_file():
            raise ConfigError(f"the run's checkpoint {ckpt_path} is missing")
        build = build_args(
            self.cfg.model, self.task.num_outputs, self.in_chans, self.input_shape[1]
        )
        model = build_reference(build)  # no download, no file named by the record
        load_weights(model, ckpt_path, self.cfg.model.arch)
        log.info("PyTorch model: %s with %s", self.cfg.model.arch, ckpt_path)
        return model.eval()

    def datamodule(self, data_dir: str | None = None):
        """The run's datamodule (test split for evaluation, training split for calibration).

        ``data_dir`` overrides where the MedMNIST file is looked for (default: where the run
        found it, else ``MEDLITE_DATA_DIR``); nothing is downloaded unless the run allowed it.
        """
        cfg = self.cfg.copy()
        recorded = self.data.get("file")
        if data_dir:
            cfg.paths.data_dir = str(data_dir)
        elif recorded and not Path(recorded).is_file():
            import os

            cfg.paths.data_dir = os.environ.get("MEDLITE_DATA_DIR", cfg.paths.data_dir)
        dm = build_datamodule(cfg)
        dm.setup()
        return dm
