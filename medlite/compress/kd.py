"""Knowledge distillation: a frozen teacher's outputs (and features) as extra training targets.

``kind: kd`` trains the model with ``w_ce`` x task loss + ``w_kd`` x logit distillation (Hinton:
temperature-softened teacher probabilities; per-label sigmoids for multi-label tasks; for
segmentation, per pixel over the class dimension of (N, K, H, W) maps, averaged over pixels) and,
when ``features`` is given, feature distillation between named layers (FitNet with a learned 1x1
adapter, or attention transfer). ``auto`` layers: a classifier's last spatial feature map, a
segmentation network's bottleneck (see :func:`auto_feature_layer`). The teacher is
``teacher: config`` (the run's ``teacher`` group, loaded from ``teacher.ckpt_path`` or trained
first) or ``teacher: base`` (the trained model as it was before compression, e.g. the unpruned
network in prune -> KD -> int8).

The teacher is held outside the student's module tree: it is not in checkpoints, not in the
optimiser, not switched to train mode by Lightning and never wrapped by DDP.
"""

from __future__ import annotations

import difflib
import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

from medlite.compress.base import CompressionStep, LossTerm, RunContext
from medlite.compress.registry import register_step
from medlite.errors import ConfigError
from medlite.models.adapters import TeacherInput
from medlite.tasks import Task

log = logging.getLogger(__name__)

TEACHER_SOURCES = ("config", "base")
FEATURE_KINDS = ("fitnet", "attention")


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    p = next(model.parameters(), None)
    if p is not None and p.device != device:
        model.to(device)
    return model


class TeacherRunner:
    """Runs the frozen teacher once per batch, however many loss terms need its outputs (feature
    hooks on the teacher fire during that one pass)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        self._x: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:
            teacher = _on_device(self.teacher, x.device).eval()
            with torch.no_grad():
                self._logits = teacher(x).float()
            self._x = x
        return self._logits


class LogitDistillation(LossTerm):
    """Hinton distillation on logits, T^2-scaled so its gradient size does not depend on T."""

    name = "kd"

    def __init__(
        self, runner: TeacherRunner, task: Task, weight: float, temperature: float
    ) -> None:
        super().__init__()
        self.runner = runner
        self.task, self.weight, self.temperature = task, float(weight), float(temperature)

    def forward(self, module, x, logits, targets) -> torch.Tensor:
        t_logits = self.runner(x)
        if t_logits.ndim == 4 and t_logits.shape[-2:] != logits.shape[-2:]:
            # a teacher at another resolution: its logit maps resampled to the student's
            t_logits = F.interpolate(
                t_logits, size=logits.shape[-2:], mode="bilinear", align_corners=False
            )
        return self.weight * distillation_loss(
            logits.float(), t_logits, self.temperature, getattr(self.task, "multilabel", False)
        )


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, multilabel: bool
) -> torch.Tensor:
    """KL(teacher || student) of softened softmaxes over the class dimension (dim 1), or
    per-label soft BCE for multi-label tasks; T^2-scaled.

    Logits (N, K) give the batch mean of the per-image KL; dense logits (N, K, H, W) (a
    segmentation network's maps) give the mean over every pixel of every image of the per-pixel
    KL between the K-class distributions.
    """
    t = temperature
    if multilabel:
        soft = torch.sigmoid(teacher / t)
        return F.binary_cross_entropy_with_logits(student / t, soft) * t * t
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "differ in shape"
        )
    k = student.shape[1]
    # (N, K, *spatial) -> (N * pixels, K): one distribution per row, batchmean = mean per pixel
    s = student.movedim(1, -1).reshape(-1, k)
    q = teacher.movedim(1, -1).reshape(-1, k)
    return (
        F.kl_div(
            F.log_softmax(s / t, dim=-1),
            F.log_softmax(q / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


def _as_map(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as is; tokens (B, N, C) (with or without one class token) -> (B, C, h, w)."""
    if feature.ndim == 4:
        return feature
    if feature.ndim == 3:
        b, n, c = feature.shape
        for drop in (0, 1):
            side = math.isqrt(n - drop)
            if side * side == n - drop and side > 0:
                return feature[:, drop:].transpose(1, 2).reshape(b, c, side, side)
    raise ValueError(f"cannot use a feature of shape {tuple(feature.shape)} as a spatial map")


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: channel-mean of squares, L2-normalised."""
    return F.normalize(feature.pow(2).mean(1).flatten(1), dim=1)


def find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    """The submodule at ``name``, or a ConfigError that suggests the nearest valid names."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"kd features: {role} layer {name!r} does not exist in {type(model).__name__}{hint} "
        f'(list them with: python -c "import medlite.models as m; '
        f"print([n for n, _ in m.create_model('<arch>', num_classes=2).named_modules()])\")"
    )


def auto_feature_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The layer ``auto`` stands for, found by running one batch through ``model``.

    A classifier (output (N, K)): the last module whose output is a spatial map (4-D, larger
    than 1x1 when there is one), i.e. the final feature map before pooling. A dense-prediction
    network (output (N, K, H, W), e.g. a segmentation U-Net): its bottleneck, the widest whole
    block at the smallest spatial size (larger than 1x1), since the last spatial maps of such a
    network are its logits (MONAI's U-Net: the deepest stage concatenated with its skip, as the
    decoder receives it; EGE-UNet: the last encoder stage). A ConfigError names candidate
    layers when there is no such layer.
    """
    seen: list[tuple[str, tuple[int, ...], bool]] = []
    outputs: list[torch.Tensor] = []

    def keep(name: str, out) -> None:
        if isinstance(out, torch.Tensor):
            seen.append((name, tuple(out.shape), False))
            outputs.append(out)

    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: keep(name, out))
        for name, m in model.named_modules()
        if name
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            final = model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    dense = (
        isinstance(final, torch.Tensor)
        and final.ndim == 4
        and final.shape[-2:] == example.shape[-2:]
    )
    if dense:
        # modules that return the logits themselves (the head, the outer containers) are not
        # features
        seen = [(n, s, out is final) for (n, s, _), out in zip(seen, outputs, strict=True)]
        outputs.clear()
        return _bottleneck(model, seen, tuple(final.shape[-2:]))
    outputs.clear()
    maps = [(n, s) for n, s, _ in seen if len(s) == 4]
    wide = [(n, s) for n, s in maps if s[2] * s[3] > 1]
    pick = (wide or maps)[-1:] if maps else []
    if not pick:
        raise ConfigError(
            f"kd features: no layer of {type(model).__name__} outputs a spatial map; "
            "name the layers explicitly (features[i].student / .teacher)"
        )
    return pick[0][0]


def _bottleneck(
    model: nn.Module, seen: list[tuple[str, tuple[int, ...], bool]], out_hw: tuple[int, int]
) -> str:
    """A dense-prediction network's bottleneck: of the modules whose output has the smallest
    spatial size (> 1x1), the outermost ones (not inside another such module), the widest
    (most channels; the last to finish of equally wide ones). Side paths at that size (masks,
    skip bridges, the decoder's first reduction) are narrower than the deepest features. Only
    (N, C, H, W) maps with the output's aspect ratio count: channels-last (N, H, W, C) blocks
    (VMamba-style) would read as maps W wide and C high."""
    out_h, out_w = out_hw
    maps = [
        (n, s)
        for n, s, is_output in seen
        if len(s) == 4 and not is_output and s[2] * out_w == s[3] * out_h
    ]
    wide = [(n, s) for n, s in maps if s[2] * s[3] > 1]
    smallest = min((s[2] * s[3] for _, s in wide), default=None)
    if smallest is None or smallest >= out_hw[0] * out_hw[1]:
        shown = ", ".join(dict.fromkeys(n for n, _ in maps[-8:])) or "(none)"
        raise ConfigError(
            f"kd features: {type(model).__name__} predicts a dense map but no layer works at a "
            "lower resolution than its output (no encoder or bottleneck to distil), so `auto` "
            "can't pick a feature layer; name the layers explicitly (features[i].student / "
            f".teacher), e.g. one of: {shown}"
        )
    deepest = [(n, s) for n, s in wide if s[2] * s[3] == smallest]
    at_bottom = {n for n, _ in deepest}
    # whole blocks, not their inner layers: drop modules inside another one at that size
    outer = [(n, s) for n, s in deepest if not any(n.startswith(f"{a}.") for a in at_bottom)]
    widest = max(s[1] for _, s in outer)
    return [n for n, s in outer if s[1] == widest][-1]


class _Capture:
    """Forward hook that keeps the latest output of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.output = output[0] if isinstance(output, (tuple, list)) else output


class FeatureDistillation(LossTerm):
    """One student/teacher layer pair: FitNet (adapter + MSE) or attention transfer."""

    def __init__(
        self,
        student: nn.Module,
        runner: TeacherRunner,
        student_layer: str,
        teacher_layer: str,
        kind: str,
        weight: float,
        example: torch.Tensor,
    ) -> None:
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ConfigError(f"kd features: kind must be one of {FEATURE_KINDS}, got {kind!r}")
        self.name = f"{kind}_{student_layer}"
        self.kind, self.weight = kind, float(weight)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.runner = runner
        teacher = runner.teacher
        self._student_hook = _Capture(find_module(student, student_layer, "student"))
        # the teacher may be wrapped by TeacherInput: look inside for the layer name
        inner = teacher.teacher if isinstance(teacher, TeacherInput) else teacher
        self._teacher_hook = _Capture(find_module(inner, teacher_layer, "teacher"))
        with torch.no_grad():
            was = student.training
            student.eval()
            student(example)
            student.train(was)
            teacher.eval()(example)
        try:
            s_map = _as_map(self._student_hook.output)
            t_map = _as_map(self._teacher_hook.output)
        except ValueError as err:
            raise ConfigError(f"kd features ({student_layer} -> {teacher_layer}): {err}") from None
        self.adapter = (
            nn.Conv2d(s_map.shape[1], t_map.shape[1], 1, bias=False) if kind == "fitnet" else None
        )
        self.shapes = {
            "student_shape": list(s_map.shape[1:]),
            "teacher_shape": list(t_map.shape[1:]),
        }

    def forward(self, module, x, logits, targets) -> torch.Tensor:
        self.runner(x)  # fills the teacher hook (once per batch)
        s = _as_map(self._student_hook.output).float()
        t = _as_map(self._teacher_hook.output).float()
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        if self.kind == "fitnet":
            return self.weight * F.mse_loss(self.adapter(s), t)
        return self.weight * (attention_map(s) - attention_map(t)).pow(2).sum(1).mean()

    def remove_hooks(self) -> None:
        self._student_hook.handle.remove()
        self._teacher_hook.handle.remove()


@register_step("kd")
class Distillation(CompressionStep):
    """Train (or fine-tune) the model against a frozen teacher."""

    needs_teacher = True

    def __init__(
        self,
        teacher: str = "config",
        w_ce: float = 1.0,
        w_kd: float = 1.0,
        temperature: float = 4.0,
        features: list[dict] | None = None,
        epochs: int = 0,
        lr: float | None = None,
    ) -> None:
        super().__init__(epochs=epochs, lr=lr)
        if teacher not in TEACHER_SOURCES:
            raise ConfigError(f"kd: teacher must be one of {TEACHER_SOURCES}, got {teacher!r}")
        if temperature <= 0:
            raise ConfigError(f"kd: temperature must be > 0, got {temperature}")
        if w_ce < 0 or w_kd < 0:
            raise ConfigError(f"kd: w_ce and w_kd must be >= 0, got {w_ce}, {w_kd}")
        if self.epochs < 1:
            raise ConfigError("kd: epochs must be >= 1 (distillation is a training phase)")
        self.teacher_source = teacher
        self.needs_teacher = teacher == "config"
        self.task_loss_weight = float(w_ce)
        self.w_kd, self.temperature = float(w_kd), float(temperature)
        self.feature_cfgs = [dict(f) for f in features or []]
        self._terms: list[LossTerm] = []

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        teacher = ctx.teacher if self.teacher_source == "config" else ctx.base_model
        if teacher is None:
            where = (
                "set the teacher group (teacher=resnet18_cifar) and teacher.ckpt_path, or let the run "
                "train it"
                if self.teacher_source == "config"
                else "use compress.base=train so a trained base model exists"
            )
            raise ConfigError(f"kd: no {self.teacher_source} teacher available; {where}")
        task: Task = ctx.datamodule.task
        runner = TeacherRunner(teacher)
        self._terms = [LogitDistillation(runner, task, self.w_kd, self.temperature)]
        example = ctx.example_input(2)
        layers = []
        for i, f in enumerate(self.feature_cfgs):
            unknown = set(f) - {"student", "teacher", "kind", "weight"}
            if unknown:
                raise ConfigError(f"kd features[{i}]: unknown keys {sorted(unknown)}")
            inner = teacher.teacher if isinstance(teacher, TeacherInput) else teacher
            s_name = f.get("student", "auto")
            t_name = f.get("teacher", "auto")
            if s_name == "auto":
                s_name = auto_feature_layer(model, example)
            if t_name == "auto":
                t_name = auto_feature_layer(inner, example)
            term = FeatureDistillation(
                model,
                runner,
                s_name,
                t_name,
                f.get("kind", "fitnet"),
                f.get("weight", 1.0),
                example,
            )
            self._terms.append(term)
            layers.append({"student": s_name, "teacher": t_name, "kind": term.kind, **term.shapes})
        self.report.update(
            teacher=self.teacher_source,
            w_ce=self.task_loss_weight,
            w_kd=self.w_kd,
            temperature=self.temperature,
            features=layers,
        )
        if layers:
            log.info(
                "kd: feature distillation %s",
                "; ".join(f"{d['student']} -> {d['teacher']} ({d['kind']})" for d in layers),
            )
        return model

    def loss_terms(self) -> list[LossTerm]:
        return list(self._terms)

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        for term in self._terms:
            if isinstance(term, FeatureDistillation):
                term.remove_hooks()
        return model
