"""Thin per-paradigm subclasses: only what genuinely differs between CNNs, Transformers and
linear-complexity (SSM / RWKV / linear-attention) models."""

from __future__ import annotations

import functools

import torch

from medlite.errors import ConfigError
from medlite.modules.base import MedliteModule

# Token-mixing parameters that regularisation should not shrink.
_TRANSFORMER_NO_DECAY = (
    "pos_embed",
    "position_embeddings",  # MONAI's name (vit3d)
    "cls_token",
    "dist_token",
    "relative_position_bias_table",
    "attention_biases",
    "rel_pos",
    "pos_bias",
)


class CNNModule(MedliteModule):
    """Lightweight CNNs: BatchNorm and biases skip weight decay; a short warm-up."""

    paradigm = "cnn"
    default_warmup = 0.05


class TransformerModule(MedliteModule):
    """Attention models: also keep position embeddings and attention biases out of weight decay,
    and warm the learning rate up (attention logits are unstable at full lr from scratch)."""

    paradigm = "transformer"
    default_warmup = 0.1
    no_decay_names = _TRANSFORMER_NO_DECAY


class LinearComplexityModule(MedliteModule):
    """Mamba/SSM, RWKV and linear attention: no weight decay on the SSM ``A``/``A_log``/``D``/``dt_bias``
    (or RWKV decay) parameters, warm-up, and fp32 islands around modules marked ``fp32_island = True``
    so recurrent scans never run in reduced precision under autocast."""

    paradigm = "linear"
    default_warmup = 0.1
    no_decay_names = _TRANSFORMER_NO_DECAY + (
        "A_log",
        "A",
        "D",
        "dt_bias",
        "time_decay",
        "time_first",
    )

    def on_fit_start(self) -> None:
        for module in self.model.modules():
            if getattr(module, "fp32_island", False) and not getattr(
                module, "_medlite_fp32", False
            ):
                module.forward = _fp32_forward(type(module).forward).__get__(
                    module
                )  # rebinds on deepcopy
                module._medlite_fp32 = True


def _fp32_forward(forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            cast = [
                a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args
            ]
            out = forward(*cast, **kwargs)
        dtype = next(
            (a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None
        )
        return out.to(dtype) if isinstance(out, torch.Tensor) and dtype is not None else out

    return wrapped


MODULES: dict[str, type[MedliteModule]] = {
    "cnn": CNNModule,
    "transformer": TransformerModule,
    "linear": LinearComplexityModule,
}


def module_class(paradigm: str) -> type[MedliteModule]:
    """The LightningModule class for a model config's ``paradigm``."""
    try:
        return MODULES[paradigm]
    except KeyError:
        raise ConfigError(
            f"model.paradigm must be one of {sorted(MODULES)}, got {paradigm!r}"
        ) from None
