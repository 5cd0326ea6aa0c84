"""Pruning: structured channel pruning (``kind: prune``) and unstructured sparsity
(``kind: prune_unstructured``).

Structured pruning removes whole channels with Torch-Pruning, so the network really gets
smaller and faster on any runtime: the step builds the dependency graph of the model (which
layers must lose the same channels: residual adds, depthwise convs, concatenations), ranks each
group of coupled channels by the L2 norm of its weights and removes the weakest, over a few
iterations with a short recovery fine-tune in between. The classifier (a segmentation
network's final conv: one output map per class) keeps its outputs, and every layer coupled to it;
a U-Net's skip-concatenations lose the same channels on both sides. Attention-like token
mixers (softmax/linear attention, selective scans, WKV) are left alone: Torch-Pruning's index
bookkeeping does not follow their head splits, flips and shifts, and pruning them gives shape
errors or silently wrong models. Which ones were kept is logged and
reported.

Unstructured pruning zeroes the smallest weights of all conv/linear layers (one global
threshold) with ``torch.nn.utils.prune``; the masks stay active during fine-tuning and are made
permanent in ``finalize``. It shrinks nothing and speeds nothing up on dense CPU kernels: it is
a sparsity (compressibility) result, and the report says so.

A structurally pruned network no longer matches its config, so its weights alone cannot rebuild
it: the run stores them with the pruned layers' shapes (:mod:`medlite.compress.structure`), from
which the config's network is rebuilt, never a pickled module.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import math
import re
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from medlite.compress.base import CompressionStep, RunContext
from medlite.compress.registry import register_step
from medlite.efficiency import count_macs, count_parameters
from medlite.errors import ConfigError, MedliteError, TrainingError

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "l1", "taylor", "random")

#: Token mixers Torch-Pruning can't prune correctly (matched on the class name): timm's
#: Attention / Attention2d / CrossCovarianceAttn / LinearSelfAttention / CascadedGroupAttention,
#: EfficientViT's LiteMLA, EfficientViM's HSMSSD, and medlite's Vim / VMamba / VRWKV mixers.
ATTENTION_LIKE = re.compile(
    r"Attention|Attn|^LiteMLA$|SSD$|SSM$|^SS2D$|^Mamba\w*Mixer$|^BiMambaMixer$"
    r"|^SpatialMix$|^ChannelMix$"
)
#: Token mixers of which only some children must stay whole: MambaOut's gated conv splits
#: ``fc1``'s output into three unequal parts (gate, identity, conv), which Torch-Pruning
#: mis-indexes; its residual stream and ``fc2`` can still be pruned.
PARTIAL_MIXERS = {"GatedConvBlock": ("fc1", "conv")}
#: Blocks Torch-Pruning 1.6 fails on though they hold only convs and BatchNorms (an IndexError in
#: its importance): FastViT's re-parameterisable MobileOne blocks. Kept whole, FastViT prunes.
#: UNeXt's shifted MLP (tokens -> map -> shift -> tokens) gives the same IndexError; kept whole,
#: UNeXt's conv stages and patch embeddings prune.
KEEP_WHOLE = {"MobileOneBlock", "ShiftedMLP"}
#: Model classes Torch-Pruning 1.6 can't analyse (measured: its graph build raises, or is still in
#: its index-mapping loop after 2 minutes): fail at once, before training, not after timeout_s.
KNOWN_UNSUPPORTED = {
    "Vim": "Torch-Pruning's dependency graph breaks on its flip + concatenate (TypeError)",
    "VRWKV": "Torch-Pruning's dependency analysis does not finish on it",
    "EfficientViM": "Torch-Pruning's dependency analysis does not finish on it",
    "EfficientVitMsra": "Torch-Pruning's dependency analysis does not finish on it",
    "UltraLightVMUNet": "Torch-Pruning mis-indexes its parallel vision-Mamba layers (IndexError), "
    "and with them kept whole no channel group is left to prune",
}
_SCAN_MAX_RATIO = 0.9  # the most a target_speedup search prunes from any layer
_SCAN_STEPS = 45  # ratio resolution of that search: 0.02
_ALTERNATIVES = "use compress=prune_unstructured or compress=lowrank for this model instead"


# ------------------------------------------------------------------------------------------------
# Model inspection


def _arch(ctx: RunContext) -> str:
    return ctx.arch or "model"


def _is_prunable_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | nn.modules.conv._ConvNd)


def _out_dim(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    return None


def called_modules(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the submodules one forward pass calls, in call order (layers a parent reads the
    weights of without calling them, like ``nn.MultiheadAttention.out_proj``, are not called)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []

    def hook(m: nn.Module, *_: Any) -> None:
        order.append(names[m])

    handles = [m.register_forward_pre_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]


def classifier_names(model: nn.Module, order: Sequence[str], num_outputs: int) -> list[str]:
    """The layers that produce the logits: timm's ``get_classifier()`` (all heads of distilled
    models), a ``classifier``/``head`` attribute, and the last conv/linear layer that runs when it
    has ``num_outputs`` outputs: a classifier's Linear, or a segmentation network's final conv
    (its 1x1 or 3x3 head, one output channel per class). Keeping them whole keeps the output
    channels; Torch-Pruning then also leaves every layer coupled to them alone (e.g. MONAI's
    U-Net adds the last transposed conv's output to its head's through a residual)."""
    modules = dict(model.named_modules())
    found: list[str] = []
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        try:
            heads = getter()
        except Exception:  # noqa: BLE001 - a model with an odd get_classifier: use the rest
            heads = None
        heads = heads if isinstance(heads, tuple | list) else (heads,)
        for name, m in modules.items():
            if name and any(m is h for h in heads if isinstance(h, nn.Module)):
                if any(p.numel() for p in m.parameters()):
                    found.append(name)
    for attr in ("classifier", "head", "head_dist", "fc"):
        m = modules.get(attr)
        if m is not None and _out_dim(m) == num_outputs and attr not in found:
            found.append(attr)
    for name in reversed(order):
        m = modules.get(name)
        if m is not None and _is_prunable_layer(m):
            if _out_dim(m) == num_outputs and name not in found:
                found.append(name)
            break
    return found


def _matches(name: str, m: nn.Module, patterns: Sequence[str]) -> bool:
    cls = type(m).__name__
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(cls, p) for p in patterns)


def modules_to_keep(model: nn.Module, extra: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """(name, class, why) of the outermost modules to leave unpruned: :data:`ATTENTION_LIKE`
    classes ("attention"), the split children of :data:`PARTIAL_MIXERS` ("token mixer"),
    :data:`KEEP_WHOLE` blocks ("unsupported block") and modules matching ``extra`` ("ignore":
    module-name or class-name globs from the step's ``ignore``)."""
    found: list[tuple[str, str, str]] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(f + ".") for f, _, _ in found):
            continue
        cls = type(m).__name__
        if _matches(name, m, extra):
            found.append((name, cls, "ignore"))
        elif ATTENTION_LIKE.search(cls):
            found.append((name, cls, "attention"))
        elif cls in KEEP_WHOLE:
            found.append((name, cls, "unsupported block"))
        elif cls in PARTIAL_MIXERS:
            for child in PARTIAL_MIXERS[cls]:
                if isinstance(getattr(m, child, None), nn.Module):
                    found.append((f"{name}.{child}", f"{cls}.{child}", "token mixer"))
    return found


def _summary(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------
# Shared helpers of both steps


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_Timeout` after ``seconds`` (SIGALRM: main thread on Unix only, else no
    limit). Torch-Pruning's dependency analysis can loop forever on some mixers."""
    usable = (
        seconds
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def alarm(*_: Any) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _train_batches(ctx: RunContext) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches without end (the loader restarts when exhausted)."""
    while True:
        empty = True
        for x, y in ctx.datamodule.train_dataloader():
            empty = False
            yield x, y
        if empty:
            raise TrainingError("the training split is empty: nothing to fine-tune pruning with")


def _default_lr(ctx: RunContext, step_lr: float | None) -> float:
    """The step's lr, else the run's AdamW/Adam lr, else 1e-3 (an SGD lr is too big for AdamW)."""
    if step_lr is not None:
        return step_lr
    optim = ctx.cfg.get("optim") or {}
    if "adam" in str(optim.get("_target_", "")).lower() and optim.get("lr") is not None:
        return float(optim.get("lr"))
    return 1e-3


def recover(
    model: nn.Module, ctx: RunContext, n_batches: int, lr: float, *, what: str
) -> float | None:
    """A short plain fine-tune (AdamW, task loss) between pruning iterations; the mean loss."""
    if n_batches <= 0:
        return None
    n_batches = ctx.capped_batches(n_batches)
    task = ctx.datamodule.task
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    losses = []
    batches = _train_batches(ctx)
    for _ in range(n_batches):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        loss = task.loss(model(x), task.targets(y))
        if not torch.isfinite(loss):
            raise TrainingError(
                f"{what}: the recovery fine-tune loss became {loss.item()} (lr {lr:g}); lower "
                "recover_lr or prune less per iteration"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    model.train(was_training)
    return sum(losses) / len(losses)


def output_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    """The shape of the model's logits for ``example`` (eval mode, no gradients): (N, K) for a
    classifier, (N, K, H, W) for a segmentation network. Pruning must not change it."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return tuple(model(example).shape)
    finally:
        model.train(was_training)


def check_outputs(
    model: nn.Module, example: torch.Tensor, expected: tuple[int, ...], what: str
) -> None:
    """The model still maps a batch to finite logits of the ``expected`` shape (the unpruned
    model's: (batch, classes), or (batch, classes, H, W) for segmentation)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as err:  # noqa: BLE001 - a broken pruned model is a user-facing failure
        raise ConfigError(
            f"{what}: the pruned model no longer runs ({type(err).__name__}: {err}); "
            f"{_ALTERNATIVES}"
        ) from err
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(expected):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{what}: the pruned model returns {shape} instead of {tuple(expected)}; "
            f"{_ALTERNATIVES}"
        )
    if not torch.isfinite(out).all():
        raise ConfigError(f"{what}: the pruned model returns non-finite logits; {_ALTERNATIVES}")


def _check_fraction(what: str, name: str, value: Any, *, low_open: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {name} must be a number, got {value!r}") from None
    if not (0.0 < v < 1.0 if low_open else 0.0 <= v < 1.0):
        bounds = "0 < {n} < 1" if low_open else "0 <= {n} < 1"
        raise ConfigError(
            f"{what}: {name}={value} is out of range; it must satisfy {bounds.format(n=name)} "
            "(the fraction removed)"
        )
    return v


def _check_count(what: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"{what}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{what}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _patterns(what: str, ignore: Any) -> tuple[str, ...]:
    if ignore is None:
        return ()
    if isinstance(ignore, str):
        return (ignore,)
    try:
        return tuple(str(p) for p in ignore)
    except TypeError:
        raise ConfigError(
            f"{what}: ignore must be a list of module names or class names (globs allowed), "
            f"got {ignore!r}"
        ) from None


def _customized_pruners(tp: Any, model: nn.Module, example: torch.Tensor) -> dict:
    """Torch-Pruning handlers medlite replaces: a channel-counting one for single-parameter PReLU.

    Torch-Pruning 1.6 reports no channel count for ``nn.PReLU(num_parameters=1)`` (it is
    channel-agnostic) and, while sizing a concatenation's inputs, follows the reshape of the
    PReLU weight instead; the dependency graph build then fails on MONAI's U-Net, where a
    PReLU'd residual unit feeds every decoder skip-concatenation. This handler gives the width
    the PReLU sees (measured on ``example``) and keeps it in step as channels are removed.
    """
    widths: dict[nn.Module, int] = {}
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU) and m.num_parameters == 1]
    if not prelus:
        return {}

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim in (2, 4):  # (N, C) or (N, C, H, W)
            widths[module] = int(output.shape[1])

    handles = [m.register_forward_hook(record) for m in prelus]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    class SharedPReLUPruner(tp.pruner.function.PReLUPruner):
        def prune_out_channels(self, layer: nn.PReLU, idxs: Sequence[int]) -> nn.Module:
            if layer.num_parameters == 1:
                if layer in widths:
                    widths[layer] -= len(idxs)
                return layer
            return super().prune_out_channels(layer, idxs)

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: nn.PReLU) -> int | None:
            if layer.num_parameters == 1:
                return widths.get(layer)
            return layer.num_parameters

        get_in_channels = get_out_channels

    return {nn.PReLU: SharedPReLUPruner()}


# ------------------------------------------------------------------------------------------------
# Structured pruning


@register_step("prune")
class StructuredPruneStep(CompressionStep):
    """Remove whole channels (Torch-Pruning, group L2 magnitude), then fine-tune.

    ``ratio``: fraction of the channels removed from every prunable group (the MACs of a conv
    between two pruned layers drop by about ``1 - (1 - ratio)^2``). ``target_speedup``: instead
    of a ratio, prune until MACs(before) / MACs(after) >= this (the ratio is found on a copy
    first). ``iterative_steps``: reach the ratio in this many equal steps, with
    ``recover_batches`` training batches (AdamW at ``recover_lr``) after each but the last.
    """

    def __init__(
        self,
        ratio: float | None = 0.5,
        target_speedup: float | None = None,
        iterative_steps: int = 5,
        recover_batches: int = 20,
        recover_lr: float | None = None,
        importance: str = "magnitude",
        round_to: int | None = 8,
        global_pruning: bool = False,
        ignore: Sequence[str] | None = (),
        timeout_s: float | None = 120,
        epochs: int = 10,
        lr: float | None = None,
    ) -> None:
        super().__init__(epochs=epochs, lr=lr)
        what = "compress step prune"
        if target_speedup is None and ratio is None:
            raise ConfigError(f"{what}: set ratio (e.g. 0.5) or target_speedup (e.g. 2.0)")
        self.ratio = None if ratio is None else _check_fraction(what, "ratio", ratio)
        self.target_speedup = None
        if target_speedup is not None:
            try:
                self.target_speedup = float(target_speedup)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{what}: target_speedup must be a number, got {target_speedup!r}"
                ) from None
            if not self.target_speedup > 1.0:
                raise ConfigError(
                    f"{what}: target_speedup={target_speedup} must be > 1 (MACs before / after)"
                )
        self.iterative_steps = _check_count(what, "iterative_steps", iterative_steps, 1)
        self.recover_batches = _check_count(what, "recover_batches", recover_batches, 0)
        self.recover_lr = None if recover_lr is None else float(recover_lr)
        if self.recover_lr is not None and not self.recover_lr > 0:
            raise ConfigError(f"{what}: recover_lr must be > 0, got {recover_lr}")
        if importance not in IMPORTANCES:
            raise ConfigError(
                f"{what}: importance={importance!r} is not one of {', '.join(IMPORTANCES)}"
            )
        self.importance = importance
        self.round_to = None if round_to is None else _check_count(what, "round_to", round_to, 1)
        self.global_pruning = bool(global_pruning)
        self.ignore = _patterns(what, ignore)
        self.timeout_s = None if timeout_s is None else float(timeout_s)

    # -- Torch-Pruning plumbing ------------------------------------------------------------------

    def _importance(self, tp: Any, kind: str) -> Any:
        if kind == "taylor":
            return tp.importance.GroupTaylorImportance()
        if kind == "random":
            return tp.importance.RandomImportance()
        return tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2)

    def _run_tp(self, fn: Any, what: str, doing: str) -> Any:
        """Call Torch-Pruning under the time limit; its failures become ConfigErrors and its
        warnings (e.g. which layer-scale parameters it prunes along their last dim) debug logs."""
        try:
            with _time_limit(self.timeout_s), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn()
            for w in caught:
                log.debug("Torch-Pruning (%s): %s", doing, w.message)
            return result
        except _Timeout:
            raise ConfigError(
                f"{what}: Torch-Pruning did not finish {doing} within {self.timeout_s:g} s "
                f"(timeout_s); {_ALTERNATIVES}"
            ) from None
        except MedliteError:
            raise
        except Exception as err:  # noqa: BLE001 - Torch-Pruning fails with many exception types
            log.debug("Torch-Pruning failed while %s", doing, exc_info=True)
            raise ConfigError(
                f"{what}: Torch-Pruning failed while {doing} ({type(err).__name__}: "
                f"{str(err)[:300]}); {_ALTERNATIVES}"
            ) from err

    def _pruner(
        self,
        tp: Any,
        model: nn.Module,
        example: torch.Tensor,
        ratio: float,
        steps: int,
        keep: Sequence[str],
        importance: str,
        what: str,
    ) -> Any:
        modules = dict(model.named_modules())
        return self._run_tp(
            lambda: tp.pruner.MetaPruner(
                model,
                example,
                importance=self._importance(tp, importance),
                pruning_ratio=ratio,
                iterative_steps=steps,
                ignored_layers=[modules[n] for n in keep],
                round_to=self.round_to,
                global_pruning=self.global_pruning,
                customized_pruners=_customized_pruners(tp, model, example),
            ),
            what,
            "building the dependency graph",
        )

    def _ratio_for_speedup(
        self,
        tp: Any,
        model: nn.Module,
        example: torch.Tensor,
        keep: Sequence[str],
        macs_before: int,
        what: str,
    ) -> tuple[float, list[dict]]:
        """The smallest ratio (in steps of 0.02) whose pruned copy reaches ``target_speedup``.
        With local pruning the channel counts depend only on the ratio, so the real (iterative)
        run lands on the same MACs."""
        probe = copy.deepcopy(model).eval()
        pruner = self._pruner(tp, probe, example, _SCAN_MAX_RATIO, _SCAN_STEPS, keep, "l2", what)
        scan: list[dict] = []
        last_macs = macs_before
        for k in range(1, _SCAN_STEPS + 1):
            self._run_tp(pruner.step, what, "pruning a copy to find the ratio")
            macs = count_macs(probe, example)
            if macs == last_macs:
                continue
            last_macs = macs
            ratio = pruner.per_step_pruning_ratio[k]
            scan.append({"ratio": round(ratio, 4), "speedup": round(macs_before / macs, 3)})
            if macs_before / macs >= self.target_speedup:
                return ratio, scan
        best = macs_before / last_macs
        raise ConfigError(
            f"{what}: target_speedup={self.target_speedup:g} is out of reach: removing "
            f"{_SCAN_MAX_RATIO:.0%} of every prunable group's channels gives {best:.2f}x fewer "
            "MACs (attention-like modules and the classifier are not pruned); ask for less, "
            "or combine with another step (lowrank, quantisation)"
        )

    def _taylor_grads(self, model: nn.Module, ctx: RunContext) -> None:
        """Gradients of the task loss on one training batch (Taylor importance reads them)."""
        task = ctx.datamodule.task
        x, y = next(_train_batches(ctx))
        device = _device(model)
        model.zero_grad(set_to_none=True)
        task.loss(model(x.to(device)), task.targets(y.to(device))).backward()

    def _check_trains(self, model: nn.Module, ctx: RunContext, what: str) -> None:
        """One train-mode forward/backward on a copy (catches layers that break only in training,
        e.g. attention-bias caches, without touching the model's BatchNorm statistics)."""
        probe = copy.deepcopy(model).train()
        task = ctx.datamodule.task
        x, y = next(_train_batches(ctx))
        x, y = x[:4].to(_device(probe)), y[:4].to(_device(probe))
        try:
            task.loss(probe(x), task.targets(y)).backward()
        except Exception as err:  # noqa: BLE001
            raise ConfigError(
                f"{what}: the pruned model fails in training mode ({type(err).__name__}: "
                f"{err}); {_ALTERNATIVES}"
            ) from err

    # -- the step --------------------------------------------------------------------------------

    def check(self, model: nn.Module, example: torch.Tensor) -> None:
        """Reject models Torch-Pruning is known to fail on before the base model is trained."""
        cls = type(model).__name__
        if cls in KNOWN_UNSUPPORTED:
            raise ConfigError(
                f"compress step prune: structured pruning is not supported for {cls}: "
                f"{KNOWN_UNSUPPORTED[cls]}; {_ALTERNATIVES}"
            )

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        try:
            import torch_pruning as tp
        except ImportError:
            raise ConfigError(
                "compress step prune needs Torch-Pruning: pip install torch-pruning"
            ) from None
        arch = _arch(ctx)
        what = f"compress step prune on model {arch}"
        cls = type(model).__name__
        if cls in KNOWN_UNSUPPORTED:
            raise ConfigError(
                f"{what}: structured pruning is not supported for {arch} ({cls}): "
                f"{KNOWN_UNSUPPORTED[cls]}; {_ALTERNATIVES}"
            )
        num_outputs = ctx.datamodule.task.num_outputs
        example = ctx.example_input(1).to(_device(model))
        was_training = model.training
        model.eval()
        order = called_modules(model, example)
        heads = classifier_names(model, order, num_outputs)
        expected = output_shape(model, example)
        kept = modules_to_keep(model, self.ignore)
        attention = [f"{n} ({c})" for n, c, why in kept if why == "attention"]
        others = [f"{n} ({c}: {why})" for n, c, why in kept if why != "attention"]
        if attention:
            log.info(
                "prune: not pruning %d attention modules in %s: %s",
                len(attention),
                arch,
                _summary(attention),
            )
        if others:
            log.info(
                "prune: not pruning %d other modules in %s: %s", len(others), arch, _summary(others)
            )
        keep = [*heads, *(n for n, _, _ in kept if n not in heads)]
        macs_before, params_before = count_macs(model, example), count_parameters(model)

        scan: list[dict] = []
        ratio = self.ratio
        if self.target_speedup is not None:
            if self.ratio is not None:
                log.info("prune: target_speedup=%g given, ratio is ignored", self.target_speedup)
            ratio, scan = self._ratio_for_speedup(tp, model, example, keep, macs_before, what)
            log.info(
                "prune: removing %.0f%% of the channels reaches %.2fx fewer MACs in %s",
                100 * ratio,
                scan[-1]["speedup"],
                arch,
            )
        pruner = self._pruner(
            tp, model, example, ratio, self.iterative_steps, keep, self.importance, what
        )
        lr = self.recover_lr or _default_lr(ctx, self.lr)
        history = []
        for i in range(1, self.iterative_steps + 1):
            if self.importance == "taylor":
                self._taylor_grads(model, ctx)
            model.eval()
            self._run_tp(pruner.step, what, f"pruning (iteration {i})")
            model.zero_grad(set_to_none=True)
            check_outputs(model, example, expected, what)
            entry = {
                "iteration": i,
                "ratio": round(pruner.per_step_pruning_ratio[i], 4),
                "macs": count_macs(model, example),
                "params": count_parameters(model),
            }
            if i < self.iterative_steps and self.recover_batches:
                entry["recover_loss"] = recover(model, ctx, self.recover_batches, lr, what=what)
            history.append(entry)
            log.info(
                "prune %s: iteration %d/%d, ratio %.2f, %.2fx fewer MACs",
                arch,
                i,
                self.iterative_steps,
                entry["ratio"],
                macs_before / max(1, entry["macs"]),
            )
        del pruner  # the dependency graph holds references to every layer
        self._check_trains(model, ctx, what)
        model.train(was_training)

        macs_after, params_after = count_macs(model, example), count_parameters(model)
        if macs_after >= macs_before:
            raise ConfigError(
                f"{what}: nothing could be pruned (MACs {macs_before} -> {macs_after}): every "
                f"channel group touches a module kept whole ({_summary(keep)}); {_ALTERNATIVES}"
            )
        speedup = macs_before / macs_after
        reached = self.target_speedup is None or speedup >= self.target_speedup - 1e-9
        if not reached:
            log.warning(
                "prune %s: reached %.2fx fewer MACs, short of target_speedup=%g",
                arch,
                speedup,
                self.target_speedup,
            )
        self.report = {
            "arch": arch,
            "method": "torch-pruning MetaPruner",
            "importance": self.importance,
            "ratio": round(ratio, 4),
            "target_speedup": self.target_speedup,
            "target_reached": reached,
            "iterative_steps": self.iterative_steps,
            "recover_batches": self.recover_batches,
            "recover_lr": lr,
            "round_to": self.round_to,
            "global_pruning": self.global_pruning,
            "macs_before": macs_before,
            "macs_after": macs_after,
            "params_before": params_before,
            "params_after": params_after,
            "speedup": round(speedup, 4),
            "params_reduction": round(params_before / params_after, 4),
            "classifier": heads,
            "ignored_modules": [{"name": n, "class": c, "why": w} for n, c, w in kept],
            "n_ignored_modules": len(kept),
            "history": history,
        }
        if scan:
            self.report["speedup_search"] = scan
        ctx.notes["pruned"] = {"macs": macs_after, "params": params_after}
        log.info(
            "prune %s: MACs %d -> %d (%.2fx), params %d -> %d",
            arch,
            macs_before,
            macs_after,
            speedup,
            params_before,
            params_after,
        )
        return model

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Re-measure after fine-tuning (the shapes can't change, but say so from the model)."""
        example = ctx.example_input(1).to(_device(model))
        self.report["macs_final"] = count_macs(model, example)
        self.report["params_final"] = count_parameters(model)
        return model


# ------------------------------------------------------------------------------------------------
# Unstructured pruning


class _DetachWeight:
    """Forward hook that leaves a detached copy of the masked weight on the module after each
    call: ``torch.nn.utils.prune`` stores ``weight`` as a non-leaf tensor, which makes the model
    impossible to deep-copy (teachers, EMA, checkpoints of copies) while the masks are active."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, *_: Any) -> None:
        w = getattr(module, self.name, None)
        if isinstance(w, torch.Tensor) and w.grad_fn is not None:
            setattr(module, self.name, w.detach())


def _remove_detach_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for key, hook in list(m._forward_hooks.items()):
            if isinstance(hook, _DetachWeight):
                del m._forward_hooks[key]


def layer_sparsity(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """name -> (zero weights, weights) of those layers, read from the effective weights."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        m = modules.get(name)
        w = getattr(m, "weight", None) if m is not None else None
        if isinstance(w, torch.Tensor):
            out[name] = (int((w == 0).sum()), w.numel())
    return out


@register_step("prune_unstructured")
class UnstructuredPruneStep(CompressionStep):
    """Zero the ``amount`` smallest-magnitude weights of all conv/linear layers (one global L1
    threshold), keep them at zero during fine-tuning, and make it permanent in ``finalize``.

    ``iterative_steps`` > 1 reaches ``amount`` in equal steps with ``recover_batches`` training
    batches between them. The classifier is left dense unless ``include_classifier``.
    """

    def __init__(
        self,
        amount: float = 0.5,
        include_classifier: bool = False,
        iterative_steps: int = 1,
        recover_batches: int = 20,
        recover_lr: float | None = None,
        ignore: Sequence[str] | None = (),
        epochs: int = 10,
        lr: float | None = None,
    ) -> None:
        super().__init__(epochs=epochs, lr=lr)
        what = "compress step prune_unstructured"
        self.amount = _check_fraction(what, "amount", amount)
        self.include_classifier = bool(include_classifier)
        self.iterative_steps = _check_count(what, "iterative_steps", iterative_steps, 1)
        self.recover_batches = _check_count(what, "recover_batches", recover_batches, 0)
        self.recover_lr = None if recover_lr is None else float(recover_lr)
        if self.recover_lr is not None and not self.recover_lr > 0:
            raise ConfigError(f"{what}: recover_lr must be > 0, got {recover_lr}")
        self.ignore = _patterns(what, ignore)
        self._layers: list[str] = []

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        from torch.nn.utils import prune

        arch = _arch(ctx)
        what = f"compress step prune_unstructured on model {arch}"
        num_outputs = ctx.datamodule.task.num_outputs
        example = ctx.example_input(1).to(_device(model))
        was_training = model.training
        model.eval()
        order = called_modules(model, example)
        heads = (
            set() if self.include_classifier else set(classifier_names(model, order, num_outputs))
        )
        expected = output_shape(model, example)
        modules = dict(model.named_modules())
        skipped = [n for n in modules if n in heads or (n and _matches(n, modules[n], self.ignore))]

        def kept(name: str) -> bool:
            return any(name == s or name.startswith(s + ".") for s in skipped)

        self._layers = [
            n
            for n in order
            if _is_prunable_layer(modules[n])
            and isinstance(getattr(modules[n], "weight", None), nn.Parameter)
            and not kept(n)
        ]
        if not self._layers:
            raise ConfigError(f"{what}: the model has no conv/linear layers to prune")
        params = [(modules[n], "weight") for n in self._layers]
        lr = self.recover_lr or _default_lr(ctx, self.lr)
        history = []
        done = 0.0  # cumulative sparsity of the pruned layers so far
        for i in range(1, self.iterative_steps + 1):
            target = self.amount * i / self.iterative_steps
            # torch's amount is relative to the weights still unpruned
            step_amount = (target - done) / (1.0 - done)
            scores = {
                (m, "weight"): (
                    m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight
                )
                .detach()
                .abs()
                for m, _ in params
            }
            prune.global_unstructured(
                params,
                pruning_method=prune.L1Unstructured,
                amount=step_amount,
                importance_scores=scores,
            )
            done = target
            for m, _ in params:
                if not any(isinstance(h, _DetachWeight) for h in m._forward_hooks.values()):
                    m.register_forward_hook(_DetachWeight("weight"))
                _DetachWeight("weight")(m)
            check_outputs(model, example, expected, what)
            entry = {"iteration": i, "target_sparsity": round(target, 4)}
            if i < self.iterative_steps and self.recover_batches:
                entry["recover_loss"] = recover(model, ctx, self.recover_batches, lr, what=what)
                for m, _ in params:  # the forward after the last update refreshes weight too
                    _DetachWeight("weight")(m)
            history.append(entry)
        model.train(was_training)
        counts = layer_sparsity(model, self._layers)
        zeros, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
        log.info(
            "prune_unstructured %s: %d layers, %.1f%% of their %d weights masked (%s kept dense)",
            arch,
            len(self._layers),
            100 * zeros / total,
            total,
            _summary(skipped) if skipped else "no layer",
        )
        self.report = {
            "arch": arch,
            "method": "torch.nn.utils.prune.global_unstructured (L1)",
            "amount": self.amount,
            "iterative_steps": self.iterative_steps,
            "recover_batches": self.recover_batches,
            "include_classifier": self.include_classifier,
            "kept_dense": skipped,
            "n_layers": len(self._layers),
            "sparsity_after_prepare": round(zeros / total, 6),
            "history": history,
        }
        return model

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Make the masks permanent (plain ``weight`` parameters again) and measure the real
        sparsity from the weights themselves."""
        from torch.nn.utils import prune

        _remove_detach_hooks(model)
        removed = 0
        for m in model.modules():
            if hasattr(m, "weight_orig") and hasattr(m, "weight_mask"):
                prune.remove(m, "weight")
                removed += 1
        counts = layer_sparsity(model, self._layers)
        zeros, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
        all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
        all_params = count_parameters(model)
        per_layer = {n: round(z / t, 4) for n, (z, t) in counts.items()}
        example = ctx.example_input(1).to(_device(model))
        self.report.update(
            {
                "masks_removed": removed,
                "sparsity": round(zeros / total, 6) if total else 0.0,
                "pruned_layer_weights": total,
                "zero_weights": zeros,
                "model_sparsity": round(all_zeros / all_params, 6) if all_params else 0.0,
                "params": all_params,
                "nonzero_params": all_params - all_zeros,
                "layer_sparsity": per_layer,
                "layer_sparsity_min": min(per_layer.values(), default=0.0),
                "layer_sparsity_max": max(per_layer.values(), default=0.0),
                "macs_dense": count_macs(model, example),
                "note": (
                    "unstructured sparsity: the zeros are stored and multiplied like any other "
                    "weight, so dense CPU kernels are not faster and the dense checkpoint is not "
                    "smaller; gains need sparse storage (e.g. compressed files) or sparse kernels"
                ),
            }
        )
        log.info(
            "prune_unstructured %s: %.1f%% of the pruned layers' weights are zero (%.1f%% of all "
            "parameters); dense CPU kernels do not get faster",
            _arch(ctx),
            100 * self.report["sparsity"],
            100 * self.report["model_sparsity"],
        )
        if math.isclose(self.report["sparsity"], 0.0) and self.amount > 0:
            log.warning("prune_unstructured: no zero weights after finalize; were masks lost?")
        return model
