"""``create_model``: medlite's own registered models first, then any timm model by name."""

from __future__ import annotations

import difflib
import logging

from torch import nn

from medlite.errors import ConfigError
from medlite.models import registry

log = logging.getLogger(__name__)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 1,
    img_size: int = 28,
    pretrained: bool = False,
    **kwargs,
) -> nn.Module:
    """Build an ``nn.Module`` classifier; unknown names raise a ConfigError with suggestions."""
    entry = registry.get_entry(name)
    if entry is not None:
        if pretrained:
            raise ConfigError(
                f"model {name!r} is medlite's own architecture and has no pretrained weights"
            )
        if img_size < entry.min_size:
            raise ConfigError(
                f"model {name!r} needs inputs of at least {entry.min_size} px, got {img_size}"
            )
        return entry.constructor(
            num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs
        )

    import timm

    if not timm.is_model(name):
        known = registry.list_models() + _timm_names()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown model {name!r}.{hint} medlite's own models: {', '.join(registry.list_models())}; "
            "any timm model name also works (see timm.list_models())."
        )
    if pretrained:
        raise ConfigError("pretrained weights are not supported yet for timm models in medlite")
    try:
        return timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            **kwargs,
        )
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        # CNN entrypoints forward **kwargs but the model class has no img_size: it adapts on its own.
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
