"""Config -> objects: the data source and datamodule, the model, the distillation teacher.

Every layer may import this module (it imports none of the pipeline, training or compression
code), so export, ``predict.py``, the teacher and the taxonomy table build things exactly as a
training run does.
"""

from __future__ import annotations

import inspect

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from medlite.data import synthetic
from medlite.data.datamodule import DataModule
from medlite.data.sources import DataSource
from medlite.errors import ConfigError
from medlite.models import create_model
from medlite.models.adapters import LogitEnsemble, TeacherInput

#: the data config keys the datamodule (not the source) reads
DATAMODULE_KEYS = (
    "as_rgb",
    "fit",
    "mean",
    "std",
    "augment",
    "batch_size",
    "eval_batch_size",
    "num_workers",
)
#: constructor arguments a source may declare that come from ``paths``, not from ``data``
PATH_ARGS = {"data_dir": "data_dir", "cache_dir": "cache_dir"}


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def source_target(data: DictConfig) -> str:
    """The source class a data config names; configs saved before sources existed name none,
    and are MedMNIST or synthetic by their flag."""
    target = data.get("_target_")
    if target:
        return str(target)
    flag = data.get("flag")
    if flag is None:
        raise ConfigError("the data config names no source (_target_); choose data=<option>")
    if synthetic.is_synthetic(flag):
        return "medlite.data.sources.synthetic.SyntheticSource"
    return "medlite.data.sources.medmnist.MedMNISTSource"


def build_source(cfg: DictConfig) -> DataSource:
    """``cfg.data`` -> its source: the class named by ``_target_``, given the keys its
    constructor declares (``data_dir``/``cache_dir`` come from ``cfg.paths``)."""
    target = source_target(cfg.data)
    try:
        cls = hydra.utils.get_class(target)
    except Exception as err:  # noqa: BLE001 - Hydra raises several types for a bad path
        raise ConfigError(f"data._target_={target}: no such class ({err})") from None
    if not (inspect.isclass(cls) and issubclass(cls, DataSource)):
        raise ConfigError(f"data._target_={target} is not a medlite data source (DataSource)")
    kwargs = {}
    for name, param in inspect.signature(cls).parameters.items():
        if name in PATH_ARGS:
            kwargs[name] = str(cfg.paths[PATH_ARGS[name]])
        elif name in cfg.data:
            kwargs[name] = _plain(cfg.data[name])
        elif param.default is inspect.Parameter.empty:
            raise ConfigError(f"data.{name} is required by {cls.__name__} but not set")
    return cls(**kwargs)


def build_datamodule(cfg: DictConfig) -> DataModule:
    """The datamodule of a run: its source plus preprocessing and loading settings."""
    d = cfg.data
    settings = {k: _plain(d.get(k)) for k in DATAMODULE_KEYS if d.get(k) is not None}
    return DataModule(
        build_source(cfg),
        input_size=cfg.model.input_size,
        pretrained_norm=_pretrained_norm(cfg),
        **settings,
    )


def _pretrained_norm(cfg: DictConfig):
    """timm's normalisation of the pretrained checkpoint ``model.pretrained=true`` loads (not of a
    ``pretrained_file``, whose statistics timm does not know), unless data.mean/std are set."""
    model = cfg.model
    if not model.get("pretrained") or model.get("pretrained_file"):
        return None
    if cfg.data.get("mean") is not None or cfg.data.get("std") is not None:
        return None
    from medlite.models import registry
    from medlite.models.pretrained import pretrained_normalisation

    if registry.get_entry(str(model.arch)) is not None:  # medlite's own: no pretrained weights
        return None
    return pretrained_normalisation(str(model.arch))


def model_dims(model_cfg: DictConfig) -> int:
    """Spatial dimensions a model config takes: its ``dims``, else its registry entry's, else 2."""
    if model_cfg.get("dims") is not None:
        return int(model_cfg.dims)
    from medlite.models import registry

    entry = registry.get_entry(str(model_cfg.get("arch")))
    return entry.dims if entry is not None else 2


def check_model_task(
    model_cfg: DictConfig, task, role: str = "model", spatial_dims: int | None = None
) -> None:
    """A classifier can't segment, a segmentation network can't classify, a 2D network can't
    take volumes: say so before any training (a model config declares ``task`` and ``dims``;
    classification and 2 when it doesn't)."""
    if spatial_dims is not None and model_dims(model_cfg) != spatial_dims:
        have, want = model_dims(model_cfg), spatial_dims
        examples = "mobilenetv2_3d, resnet18_3d, vim3d" if want == 3 else "litecnn, resnet18"
        what = {2: "2D images", 3: "3D volumes"}
        raise ConfigError(
            f"{role}={model_cfg.name} is a {have}D model, but this dataset holds {what[want]}; "
            f"choose a {want}D {role}, e.g. {role}={examples.split(', ')[0]} ({examples})"
        )
    kind = model_cfg.get("task") or "classification"
    if kind != task.kind:
        examples = {"classification": "litecnn, resnet18", "segmentation": "unet, egeunet"}
        raise ConfigError(
            f"{role}={model_cfg.name} is a {kind} model, but this dataset's task is "
            f"{task.kind} ({task.type}); choose a {task.kind} {role}, e.g. "
            f"{role}={examples.get(task.kind, '...').split(', ')[0]} "
            f"({examples.get(task.kind, '')})"
        )


def build_model(
    model_cfg: DictConfig, num_classes: int, in_chans: int, img_size: int
) -> torch.nn.Module:
    """A model (or teacher) config -> nn.Module. The module carries ``medlite_spec`` (see
    :func:`model_spec`), which the LightningModule saves with its checkpoints."""
    kwargs = _plain(model_cfg.kwargs) if model_cfg.get("kwargs") else {}
    net = create_model(
        model_cfg.arch,
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        pretrained=model_cfg.pretrained,
        pretrained_file=model_cfg.get("pretrained_file"),
        **kwargs,
    )
    net.medlite_spec = model_spec(model_cfg, num_classes, in_chans, img_size, net)
    return net


def model_spec(
    model_cfg: DictConfig, num_classes: int, in_chans: int, img_size: int, net: torch.nn.Module
) -> dict | None:
    """What rebuilds ``net`` from its config (``MedliteModule.load_from_checkpoint``), in plain
    containers (a checkpoint stays loadable with ``weights_only=True``), with the parameter and
    tensor counts that tell a later, structurally compressed network from this one."""
    try:
        config = _plain(model_cfg)
    except Exception:  # noqa: BLE001 - an unresolvable key: no spec, training goes on
        return None
    return {
        "config": config,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "img_size": int(img_size),
        "fingerprint": network_fingerprint(net),
    }


def network_fingerprint(net: torch.nn.Module) -> list[int]:
    """[parameters, state-dict tensors]: changes when pruning, factorising or quantising
    reshapes or replaces layers."""
    return [sum(p.numel() for p in net.parameters()), len(net.state_dict())]


#: model kwargs that make a model constructor read files or the network: never from a record
UNSAFE_MODEL_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def rebuild_model(
    model_cfg: dict, num_classes: int, in_chans: int, img_size: int
) -> torch.nn.Module:
    """The network a recorded model config (a checkpoint's or a compressed model's, possibly from
    someone else's run) builds: fresh weights, nothing downloaded, and kwargs that would load a
    file refused; the caller loads its own weights."""
    cfg = dict(model_cfg)
    unsafe = sorted(k for k in (cfg.get("kwargs") or {}) if k in UNSAFE_MODEL_KWARGS)
    if unsafe or ":" in str(cfg.get("arch", "")):
        raise ConfigError(
            f"model config {cfg.get('arch')!r} asks to load files or download ({unsafe or 'arch'}"
            "); a saved model's config must not"
        )
    cfg.update(pretrained=False, pretrained_file=None)
    with torch.random.fork_rng(devices=[]):  # building must not move the run's random stream
        return build_model(OmegaConf.create(cfg), num_classes, in_chans, img_size)


def teacher_members(t: DictConfig) -> int:
    """How many independently trained networks the teacher averages (``teacher.members``)."""
    n = t.get("members", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"teacher.members={n!r} must be a whole number >= 1")
    return n


def build_teacher(cfg: DictConfig, datamodule: DataModule) -> torch.nn.Module:
    """The ``teacher`` config's network (with ``teacher.members`` > 1 an ensemble of that many,
    logits averaged), adapted to the student's input (size, normalisation)."""
    t = cfg.teacher
    student_size = datamodule.preprocess.input_size
    nets = [
        build_model(
            t, datamodule.task.num_outputs, datamodule.in_chans, t.input_size or student_size
        )
        for _ in range(teacher_members(t))
    ]
    net = nets[0] if len(nets) == 1 else LogitEnsemble(nets)
    norm = (list(t.mean), list(t.std)) if t.get("mean") and t.get("std") else None
    return TeacherInput(
        net,
        size=t.input_size if t.input_size and t.input_size != student_size else None,
        student_norm=(
            datamodule.preprocess.mean.flatten().tolist(),
            datamodule.preprocess.std.flatten().tolist(),
        ),
        teacher_norm=norm,
    )
