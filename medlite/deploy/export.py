"""Export a trained run for the edge and prove the export is the same model.

Formats (the table is medlite/deploy/runtimes.py): ONNX fp32, ONNX int8 (ONNX Runtime static
QDQ, calibrated on the training split; or the int8 file the run's own ptq/qat/dynamic recipe made),
OpenVINO fp32 and int8 (converted from the ONNX file; NNCF int8, with accuracy control when plain
int8 loses too much on the validation split), ExecuTorch fp32 and int8 (XNNPACK) and a
``torch.export`` program. Each is run over the whole test split next to the PyTorch model: max
|logit difference| (over every logit, every pixel of a segmentation map too), agreement of
predicted labels (of pixels, for segmentation), and the run's metrics through that runtime (a segmentation run's model card also
gets a few test images drawn with their masks, ``export/examples.png``). A parity or accuracy
check that fails raises :class:`ExportError` after ``export.json`` is written, so nothing
measured is lost.

A classification run's temperature (``results.json`` calibration) is baked into every graph:
the exported models output ``logits / T``, whose softmax / sigmoid are the calibrated
probabilities, and the parity checks compare those with the PyTorch model divided by T.
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from rich.progress import track
from torch import nn

from medlite.atomic import DiskFullError, atomic_path, copy_file
from medlite.compress.base import RunContext
from medlite.deploy import runtimes
from medlite.deploy.model_card import (
    EXAMPLES_PNG,
    plot_roc,
    plot_segmentation_examples,
    write_model_card,
)
from medlite.deploy.onnx import (
    export_onnx,
    model_metadata,
    onnx_exporter,
    onnx_opset,
    write_metadata,
)
from medlite.deploy.run_dir import TrainedRun
from medlite.efficiency import count_macs, count_parameters, interleaved_latency_ms
from medlite.errors import ConfigError, MedliteError
from medlite.results import package_versions, write_json
from medlite.tasks import calibration

log = logging.getLogger(__name__)

#: every format export can write (see medlite/deploy/runtimes.py); ``all`` in
#: ``formats`` means each of them whose runtime is installed here
FORMATS = tuple(runtimes.FORMATS)
#: test images drawn with their masks for the model card of a segmentation run
EXAMPLES_N = 4
FILE_NAMES = {name: fmt.file for name, fmt in runtimes.FORMATS.items()}


class ExportError(MedliteError):
    """An export failed, or an exported model does not match the trained one closely enough."""


@dataclass
class ExportSettings:
    """What to export and how strict the checks are (``conf/export/*.yaml`` has the same keys)."""

    #: any of onnx_fp32, onnx_int8, openvino_fp32, openvino_int8, executorch_fp32, executorch_int8,
    #: torch_export; ``all``: every format whose runtime is installed (the others are skipped,
    #: with the reason recorded)
    formats: list[str] = field(default_factory=lambda: ["all"])
    #: fp32 formats: max |logit diff| allowed, relative to max(1, largest |logit|)
    fp32_tolerance: float = 1e-3
    #: int8: largest drop of the task's monitored metric, on the test split, against PyTorch
    #: (classification: AUC, segmentation: Dice; 0.01 = one point)
    int8_max_drop: float = 0.01
    #: int8 calibration: training batches (no augmentation) and per-channel weight scales
    calibration_batches: int = 8
    per_channel: bool = True
    #: ONNX opset (null: the exporter's default)
    opset: int | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in (*FORMATS, "all")]
        if unknown or not self.formats:
            raise ConfigError(
                f"export formats must be a non-empty subset of {FORMATS} (or all), got "
                f"{self.formats}"
            )
        for fmt in self.formats:  # named explicitly: its runtime must be here, before training
            if fmt != "all":
                runtimes.require(fmt)
        if self.fp32_tolerance <= 0 or self.int8_max_drop < 0:
            raise ConfigError("export tolerances must be positive")

    def resolved(self) -> tuple[list[str], dict[str, str]]:
        """The formats to write, in dependency order (ONNX before the OpenVINO files converted
        from it), and the formats ``all`` skipped, each with why."""
        wanted = set(FORMATS) if "all" in self.formats else set(self.formats)
        skipped = {
            f: runtimes.install_hint(f)
            for f in FORMATS
            if f in wanted and f not in self.formats and not runtimes.installed(f)
        }
        return [f for f in FORMATS if f in wanted and f not in skipped], skipped


def settings_from_config(node) -> ExportSettings | None:
    """``cfg.export`` (a conf/export option) -> settings, or None when nothing is to be exported."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    if not values or not values.get("formats"):
        return None
    known = {f.name for f in fields(ExportSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hint = "".join(f"; {k}: did you mean {m[0]}?" for k, m in hints.items() if m)
        raise ConfigError(f"unknown export key(s) {unknown}; valid keys: {sorted(known)}{hint}")
    return ExportSettings(**values)


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path) -> nn.Module:
    """``torch.export`` with a dynamic batch, saved as ``.pt2``; returns the reloaded program."""
    x = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).clone()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    return torch.export.load(str(path)).module()


def _int8_from_recipe(run: TrainedRun, path: Path) -> dict:
    copy_file(run.int8_onnx, path)
    steps = run.results["compress"]["steps"]
    return {"source": f"the run's compression recipe ({' -> '.join(steps)})"}


def _int8_by_ptq(
    run: TrainedRun, model: nn.Module, dm, settings: ExportSettings, path: Path
) -> dict:
    """Static int8 of ``model`` with the same code path as ``compress=ptq``."""
    from medlite.compress.quantize import PostTrainingQuantization

    step = PostTrainingQuantization(
        calibration_batches=settings.calibration_batches,
        per_channel=settings.per_channel,
        opset=settings.opset,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(cfg=run.cfg, datamodule=dm, output_dir=Path(tmp))
        step.prepare(model, ctx)
        copy_file(Path(tmp) / "compressed" / "model_int8.onnx", path)
    keep = ("calibration_images", "int8_weight_fraction", "weight_dtypes_int8", "preprocess")
    return {"source": "post-training static quantisation (QDQ, ONNX Runtime)"} | {
        k: step.report[k] for k in keep if k in step.report
    }


def _divide_onnx_logits(path: Path, temperature: torch.Tensor) -> None:
    """Append ``logits / T`` to an ONNX file whose graph outputs raw logits (an int8 file made
    from the uncalibrated network), so every exported graph outputs calibrated logits."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    out = proto.graph.output[0].name
    raw = f"{out}_before_temperature"
    for node in proto.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
        node.input[:] = [raw if i == out else i for i in node.input]
    t = np.asarray(temperature, dtype=np.float32).reshape(-1)
    proto.graph.initializer.append(numpy_helper.from_array(t, name="medlite_temperature"))
    proto.graph.node.append(helper.make_node("Div", [raw, "medlite_temperature"], [out]))
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))


def _parity(ref: np.ndarray, got: np.ndarray, diff: dict, task) -> dict:
    """Logit differences (measured batch by batch in :func:`_run_all`) and how often the two
    runtimes predict the same: per image for classification (every label for multi-label
    tasks), per pixel for segmentation (the share of pixels given the same class)."""
    a, b = task.predictions(ref), task.predictions(got)
    same = (a == b).all(axis=-1) if getattr(task, "multilabel", False) else a == b
    return {
        "max_abs_diff": diff["max_abs_diff"],
        "mean_abs_diff": diff["mean_abs_diff"],
        "label_agreement": float(np.mean(same)),
    }


def _metric_drop(reference: dict, got: dict, task, settings: ExportSettings) -> dict:
    """How much worse int8 is on the task's monitored metric (test split) than PyTorch:
    ``{"metric", "drop", "tolerance": {"drop"}, "ok"}``; the drop is positive when int8 is
    worse, whichever way the metric improves."""
    metric = task.monitor_metric
    drop = reference[metric] - got[metric]
    if task.monitor_mode == "min":
        drop = -drop
    return {
        "metric": metric,
        "drop": float(drop),
        "tolerance": {"drop": settings.int8_max_drop},
        "ok": bool(drop <= settings.int8_max_drop),
    }


def _run_all(
    models: dict[str, nn.Module], dm, task
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict]]:
    """Every model over the test split, batch by batch (dynamic batch sizes included: the last
    batch is usually smaller). Returns the labels, what evaluation keeps of each model's outputs
    (``task.eval_outputs``: probabilities for classification, hard masks for segmentation, so
    (N, K, H, W) logits of a whole split are never held), and per model its logit difference
    from PyTorch: ``{"max_abs_diff", "mean_abs_diff", "max_abs_logit"}`` (PyTorch's largest
    |logit|, which scales the fp32 tolerance)."""
    labels, outputs = [], {name: [] for name in models}
    sums = {name: {"max": 0.0, "sum": 0.0, "n": 0} for name in models}
    largest = 0.0
    loader = dm.test_dataloader()
    with torch.inference_mode():
        for x, y in track(loader, description="test split through each runtime", transient=True):
            labels.append(y.numpy())
            ref = models["pytorch"](x).float().cpu()
            largest = max(largest, float(ref.abs().max()))
            for name, m in models.items():
                logits = ref if name == "pytorch" else m(x).float().cpu()
                if logits.shape != ref.shape:
                    raise ExportError(
                        f"{name} returns {tuple(logits.shape)} for a batch on which PyTorch "
                        f"returns {tuple(ref.shape)}"
                    )
                diff = (logits - ref).abs()
                acc = sums[name]
                acc["max"] = max(acc["max"], float(diff.max()))
                acc["sum"] += float(diff.double().sum())
                acc["n"] += diff.numel()
                outputs[name].append(task.eval_outputs(logits).numpy())
    diffs = {
        name: {
            "max_abs_diff": acc["max"],
            "mean_abs_diff": acc["sum"] / max(1, acc["n"]),
            "max_abs_logit": largest,
        }
        for name, acc in sums.items()
    }
    return np.concatenate(labels), {k: np.concatenate(v) for k, v in outputs.items()}, diffs


def _segmentation_examples(
    dm, labels: np.ndarray, masks: np.ndarray, task, path: Path, n: int = EXAMPLES_N
) -> Path:
    """``n`` test images spread evenly over the split, each with the PyTorch model's mask (colour)
    and the reference mask (white outline), at the model's input size."""
    test = dm.splits["test"]
    idx = np.unique(np.linspace(0, len(test) - 1, min(n, len(test))).round().astype(int))
    mean, std = dm.preprocess.mean, dm.preprocess.std
    images, truths, preds, titles = [], [], [], []
    for i in idx:
        x, _ = test[int(i)]
        image = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        image = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
        truth, pred = np.asarray(labels[i]), np.asarray(masks[i])
        score = task.metrics(truth[None], pred[None])[task.monitor_metric]
        images.append(image.numpy())
        truths.append(truth)
        preds.append(pred)
        titles.append(f"test #{int(i)}: {task.title(task.monitor_metric)} {score:.2f}")
    return plot_segmentation_examples(images, truths, preds, task.labels, titles, path)


class _Writer:
    """Writes one format at a time (ONNX, OpenVINO, ExecuTorch, torch.export); an OpenVINO file
    is converted from the ONNX file this export just wrote, or from one made for it in
    ``scratch`` when that format was not asked for."""

    def __init__(self, run, raw, model, dm, example, settings, metadata, temperature) -> None:
        self.run, self.raw, self.model, self.dm = run, raw, model, dm
        self.example, self.settings = example, settings
        self.metadata, self.temperature = metadata, temperature
        self.made: dict[str, Path] = {}  # formats written and loaded in this export
        self.scratch = Path(tempfile.gettempdir())
        self.program: nn.Module | None = None

    def write(self, fmt: str, path: Path) -> dict:
        """Write ``fmt`` to ``path``; returns what export.json records about how."""
        if fmt == "onnx_fp32":
            export_onnx(
                self.model, self.example, path, opset=self.settings.opset, metadata=self.metadata
            )
            return {"exporter": onnx_exporter(path), "opset": onnx_opset(path)}
        if fmt == "onnx_int8":
            if self.run.int8_onnx is not None:
                entry = _int8_from_recipe(self.run, path)
            else:
                entry = _int8_by_ptq(self.run, self.raw, self.dm, self.settings, path)
            if self.temperature is not None:
                _divide_onnx_logits(path, self.temperature)
            write_metadata(path, self.metadata)  # the int8 file explains itself too
            return entry | {"opset": onnx_opset(path)}
        if fmt == "openvino_fp32":
            from medlite.deploy import openvino_runtime as openvino
            from medlite.deploy import openvino_scan

            checked = self._source("onnx_fp32")
            fused_error = None
            if openvino_scan.uses_selective_scan(self.model, self.example):
                fused = self.scratch / "model_fused_scan.onnx"
                try:
                    nodes = openvino_scan.export_fused_onnx(
                        self.model, self.example, fused, self.settings.opset
                    )
                    openvino.convert_onnx(fused, path, self.metadata, metadata_from=checked)
                    return {
                        "source": "the model traced with one medlite selective-scan operation "
                        "per scan (medlite's C kernel inside OpenVINO)",
                        "fused_scans": nodes,
                    }
                except DiskFullError:
                    raise
                except Exception as err:  # noqa: BLE001  (the standard-op graph still works)
                    fused_error = f"{type(err).__name__}: {err}"
                    log.warning("fused scans not exported (%s); standard ops instead", fused_error)
                finally:
                    fused.unlink(missing_ok=True)
            openvino.convert_onnx(checked, path, self.metadata)
            entry = {"source": "converted from the ONNX fp32 file"}
            return entry | ({"fused_error": fused_error} if fused_error else {})
        if fmt == "openvino_int8":
            from medlite.deploy import openvino_runtime as openvino

            if self.run.int8_onnx is not None:  # OpenVINO runs a QDQ file as int8 itself
                openvino.convert_onnx(self._source("onnx_int8"), path, self.metadata)
                steps = " -> ".join(self.run.results["compress"]["steps"])
                entry = {"source": f"the run's compression recipe ({steps}), converted"}
            else:
                batches = self._calibration_batches()
                transformer = self.run.results["model"].get("paradigm") == "transformer"
                entry = openvino.quantize(
                    self._source("openvino_fp32"), batches, path,
                    transformer=transformer, metadata=self.metadata,
                    validation=self._validation(), max_drop=self.settings.int8_max_drop,
                )  # fmt: skip
            return entry
        if fmt in ("executorch_fp32", "executorch_int8"):
            from medlite.deploy.executorch_runtime import export_program

            calibration = self._calibration_batches() if fmt == "executorch_int8" else None
            return export_program(
                self.model,
                self.example,
                path,
                metadata=self.metadata,
                calibration=calibration,
                per_channel=self.settings.per_channel,
            )
        self.program = _torch_export(self.model, self.example, path)
        return {}

    def _calibration_batches(self) -> list[torch.Tensor]:
        """``calibration_batches`` training batches without augmentation (ONNX Runtime's PTQ
        takes the same ones, through compress.quantize)."""
        loader = self.dm.calibration_dataloader()
        return [x for x, _ in itertools.islice(loader, self.settings.calibration_batches)]

    def _validation(self):
        """The validation split and a score of a compiled model on it (the monitored metric,
        higher is better): what decides whether int8 needs layers kept in fp32."""
        task = self.run.task
        items = [(x.numpy(), y.numpy()) for x, y in self.dm.val_dataloader()]

        def score(compiled, data) -> float:
            labels, outputs = [], []
            for x, y in data:
                logits = torch.from_numpy(np.asarray(compiled(x)[0], dtype=np.float32))
                outputs.append(task.eval_outputs(logits).numpy())
                labels.append(y)
            value = task.metrics(np.concatenate(labels), np.concatenate(outputs))
            value = float(value[task.monitor_metric])
            return value if task.monitor_mode == "max" else -value

        return items, score

    def _source(self, fmt: str) -> Path:
        """The file of ``fmt`` written by this export, else a scratch copy made now."""
        if fmt in self.made:
            return self.made[fmt]
        path = self.scratch / FILE_NAMES[fmt]
        if not path.is_file():
            self.write(fmt, path)
        return path


def export_run(
    run: TrainedRun | str | Path,
    settings: ExportSettings | None = None,
    *,
    data_dir: str | None = None,
) -> dict:
    """Export ``run`` into ``<run>/export/`` and check every format; returns export.json's dict.

    Raises :class:`ExportError` (after writing export.json) when a format could not be
    exported, or its logits / monitored metric are outside the tolerances of ``settings``.
    """
    run = run if isinstance(run, TrainedRun) else TrainedRun.load(run)
    settings = settings or ExportSettings()
    out = run.export_dir
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    raw = run.torch_model()
    temperature = calibration.temperature_of(run.results)  # None: not a calibrated classifier
    model = calibration.scaled(raw, run.results)  # every format outputs logits / T
    dm = run.datamodule(data_dir)
    example = next(iter(dm.calibration_dataloader(batch_size=2)))[0]
    task = run.task
    try:
        macs = count_macs(model, example[:1])
    except Exception:  # noqa: BLE001 - a report nicety
        macs = None
    params = count_parameters(model)

    formats: dict[str, dict] = {}
    models: dict[str, nn.Module] = {"pytorch": model}
    metadata = model_metadata(run.data["preprocess"], task.record())
    if temperature is not None:  # predict.py reads it: T is in the graph, not to apply again
        metadata[calibration.ONNX_KEY] = json.dumps(calibration.temperature_list(temperature))
    wanted, skipped = settings.resolved()
    for fmt, why in skipped.items():
        log.info("export: %s skipped (%s)", fmt, why)
    writer = _Writer(run, raw, model, dm, example, settings, metadata, temperature)
    with tempfile.TemporaryDirectory(prefix="medlite_export_") as scratch:
        writer.scratch = Path(scratch)
        for fmt in wanted:
            path = out / FILE_NAMES[fmt]
            files = runtimes.files_of(fmt, out)
            for f in files:
                f.unlink(missing_ok=True)
            entry: dict = {"path": str(path.relative_to(run.path))}  # moves with the run
            entry |= {"runtime": runtimes.FORMATS[fmt].runtime}
            entry |= {"precision": runtimes.FORMATS[fmt].precision}
            log.info("exporting %s as %s", run.name, fmt)
            try:
                entry |= writer.write(fmt, path)
                if fmt == "torch_export":
                    models[fmt] = writer.program
                else:
                    models[fmt] = runtimes.load(fmt, path, params=params, macs=macs)
            except DiskFullError:
                raise  # one clear message, not a failed format among others
            except Exception as err:  # noqa: BLE001 - recorded, then raised with the others
                for f in files:
                    f.unlink(missing_ok=True)
                entry["error"] = f"{type(err).__name__}: {err}"
                log.error("%s export of %s failed: %s", fmt, run.name, entry["error"])
            else:
                entry["size_mb"] = round(runtimes.size_mb(fmt, out), 4)
                writer.made[fmt] = path
            formats[fmt] = entry

    labels, outputs, diffs = _run_all(models, dm, task)
    reference = task.metrics(labels, outputs["pytorch"])
    problems = []
    for fmt, entry in formats.items():
        if "error" in entry:
            problems.append(f"{fmt}: {entry['error']}")
            continue
        entry["test"] = task.metrics(labels, outputs[fmt])
        entry["parity"] = _parity(outputs["pytorch"], outputs[fmt], diffs[fmt], task)
        if runtimes.FORMATS[fmt].precision == "int8":
            entry["parity"] |= _metric_drop(reference, entry["test"], task, settings)
            if not entry["parity"]["ok"]:
                name = task.title(task.monitor_metric)
                problems.append(
                    f"{fmt}: test {name} {entry['test'][task.monitor_metric]:.4f} is "
                    f"{entry['parity']['drop']:.4f} worse than PyTorch "
                    f"({reference[task.monitor_metric]:.4f}), more than export.int8_max_drop="
                    f"{settings.int8_max_drop}; try compress=qat, more calibration_batches, "
                    "or per_channel=true"
                )
        else:
            tol = settings.fp32_tolerance * max(1.0, diffs["pytorch"]["max_abs_logit"])
            entry["parity"]["tolerance"] = {"max_abs_diff": tol}
            entry["parity"]["ok"] = bool(entry["parity"]["max_abs_diff"] <= tol)
            if not entry["parity"]["ok"]:
                problems.append(
                    f"{fmt}: logits differ from PyTorch by up to "
                    f"{entry['parity']['max_abs_diff']:.3g} on the test split (tolerance {tol:.3g})"
                )

    formats = _previous_formats(out, formats) | formats
    formats = {f: formats[f] for f in FORMATS if f in formats}
    try:
        latency = _deployed_latency(run, models, formats, example[:1], params, macs)
    except Exception as err:  # noqa: BLE001 - the checks matter more than the timing
        log.warning("deployed latency not measured: %s", err)
        latency = None
    record = {
        "run_dir": str(run.path),
        "model": run.results["model"],
        "compress": run.results["compress"],
        "input": {"shape": list(run.input_shape), **run.data["preprocess"]},
        "task": task.record(),
        "n_test_images": int(len(labels)),
        "reference": {
            "runtime": "pytorch eager",
            "params": params,
            "macs": macs,
            "test": reference,
        },
        "formats": formats,
        "skipped": skipped,
        "latency": latency,
        "calibration": None
        if temperature is None
        else {
            "temperature": calibration.temperature_list(temperature),
            "applied": "every exported graph outputs logits / T (calibrated)",
        },
        "settings": asdict(settings),
        "status": "failed" if problems else "ok",
        "problems": problems,
        "versions": package_versions(),
        "wall_time_s": round(time.time() - start, 2),
    }
    if task.kind == "classification":  # ROC curves only mean something for classifiers
        try:
            shown = ("pytorch", "onnx_int8")
            plot_roc(
                labels, {k: v for k, v in outputs.items() if k in shown}, task, out / "roc.png"
            )
        except Exception as err:  # noqa: BLE001 - the numbers matter more than the picture
            log.warning("could not draw the ROC plot: %s", err)
    elif task.kind == "segmentation":  # a few test images with their masks, for the card
        (out / EXAMPLES_PNG).unlink(missing_ok=True)
        try:
            _segmentation_examples(dm, labels, outputs["pytorch"], task, out / EXAMPLES_PNG)
        except Exception as err:  # noqa: BLE001 - the numbers matter more than the picture
            log.warning("could not draw the segmentation examples: %s", err)
    write_json(out / "export.json", record)
    if latency is not None:
        _record_deployed_latency(run, latency)
    write_model_card(run)
    if problems:
        raise ExportError(
            f"export of {run.name} did not pass its checks (details in {out / 'export.json'}):\n  "
            + "\n  ".join(problems)
        )
    return record


def _deployed_latency(
    run: TrainedRun,
    models: dict[str, nn.Module],
    formats: dict[str, dict],
    example: torch.Tensor,
    params: int,
    macs: int | None,
) -> dict:
    """Eager PyTorch and every exported runtime that passed its checks (those of earlier exports
    too), timed in turns in this process at the run's profile thread count: the fastest one is
    the run's deployed latency, what a comparison of models on this machine should rank by."""
    timed = {"pytorch": models["pytorch"]}
    for fmt in runtimes.DEPLOYABLE:  # table order
        entry = formats.get(fmt) or {}
        if not (entry.get("parity") or {}).get("ok"):
            continue
        timed[fmt] = models.get(fmt) or runtimes.load(
            fmt, run.path / entry["path"], params=params, macs=macs
        )
    eff = run.results.get("efficiency") or {}
    prof = run.cfg.get("profile") or {}
    threads = int(eff.get("threads") or prof.get("threads") or torch.get_num_threads())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = interleaved_latency_ms(
            timed,
            example,
            warmup=int(prof.get("warmup") or 5),
            repeats=max(10, int(prof.get("repeats") or 30)),
        )
    finally:
        torch.set_num_threads(old)
    median = {name: round(statistics.median(t), 4) for name, t in times.items()}
    fastest = min(median, key=median.get)
    log.info(
        "batch-1 latency, %d thread(s): %s; deployed: %s",
        threads,
        ", ".join(f"{runtimes.LABELS[k]} {v:.3f} ms" for k, v in median.items()),
        runtimes.LABELS[fastest],
    )
    return {"threads": threads, "median_ms": median, "fastest": fastest}


def _record_deployed_latency(run: TrainedRun, latency: dict) -> None:
    """results.json's efficiency profile gains the deployed latency beside the eager one."""
    path = run.path / "results.json"
    results = json.loads(path.read_text())
    eff = results.get("efficiency") or {}
    median = latency["median_ms"]
    eff.update(
        eager_latency_ms=median["pytorch"],
        deployed_latency_ms=median[latency["fastest"]],
        deployed_runtime=latency["fastest"],
        deployed=median,
        deployed_threads=latency["threads"],
    )
    results["efficiency"] = eff
    write_json(path, results)
    run.results["efficiency"] = eff


def _previous_formats(out: Path, now: dict[str, dict]) -> dict[str, dict]:
    """Formats exported earlier and not redone now (whose files still exist): exporting one
    format later must not drop the record of the others from export.json, nor the record of a
    file that failed its checks (it stays on disk, and its failure must stay visible)."""
    try:
        old = json.loads((out / "export.json").read_text())["formats"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {
        fmt: {**entry, "path": f"{out.name}/{Path(entry['path']).name}"}  # relative to the run
        for fmt, entry in old.items()
        if fmt not in now
        and "parity" in entry
        and (out / Path(entry.get("path", "")).name).is_file()  # this run's file, never another's
    }
