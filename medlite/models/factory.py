"""``create_model``: medlite's own registered models first, then any timm model by name.

timm models can start from pretrained weights (:mod:`medlite.models.pretrained`): timm's ImageNet
weights, or a local file. Variants (``mobilevit_xs`` vs ``mobilevit_xxs``) are plain timm names:
the model configs build ``arch`` from ``model.variant`` (``arch: mobilevit_${.variant}``).
"""

from __future__ import annotations

import difflib
import logging
import os

from torch import nn

from medlite.efficiency import count_parameters  # noqa: F401  (re-exported)
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
    pretrained_file: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build an ``nn.Module`` classifier; unknown names raise a ConfigError with suggestions.

    ``pretrained=True`` loads timm's pretrained weights for ``name`` or, with ``pretrained_file``,
    a local weights file (adapted to ``in_chans``, ``num_classes`` and ``img_size``); without
    network and without cached weights it fails at once with a ConfigError.
    """
    entry = registry.get_entry(name)
    if entry is not None:
        if pretrained or pretrained_file:
            raise ConfigError(
                f"model {name!r} is medlite's own architecture and has no pretrained weights "
                "(model.pretrained / model.pretrained_file are for timm models)"
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
            f"unknown model {name!r}.{hint}{_variant_hint(name)} medlite's own models: "
            f"{', '.join(registry.list_models())}; any timm model name also works "
            "(see timm.list_models())."
        )
    if pretrained_file is not None and not pretrained:
        raise ConfigError(
            f"model.pretrained_file={str(pretrained_file)!r} is set but model.pretrained=false; "
            "set model.pretrained=true to load it (or pretrained_file=null)"
        )

    def build(**timm_kwargs) -> nn.Module:
        return _create_timm(name, num_classes, in_chans, img_size, **kwargs, **timm_kwargs)

    if pretrained:
        from medlite.models.pretrained import create_pretrained

        return create_pretrained(build, name, num_classes, pretrained_file)
    return build(pretrained=False)


def _create_timm(name: str, num_classes: int, in_chans: int, img_size: int, **kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(
            name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs
        )
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        # CNN entrypoints forward **kwargs but the model class has no img_size: it adapts on its own.
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _variant_hint(name: str) -> str:
    """For a mistyped variant like ``mobilevit_xxxs``: timm's names of that family (``mobilevit_*``)."""
    family = name.rsplit("_", 1)[0] if "_" in name else ""
    if not family:
        return ""
    import timm

    members = timm.list_models(f"{family}_*")
    if not members:
        return ""
    more = f", ... ({len(members)} in all)" if len(members) > 12 else ""
    return f" timm's {family}_* models: {', '.join(members[:12])}{more}."
