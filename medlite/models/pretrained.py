"""Pretrained weights for timm models: timm's ImageNet weights or a local file, adapted to medlite.

``model.pretrained=true`` loads timm's default pretrained weights for ``model.arch``; with
``model.pretrained_file=<path>`` it loads that file instead (a ``torch.save``d state_dict, a
checkpoint dict holding one under ``state_dict``/``model``, a medlite Lightning checkpoint, or a
``.safetensors`` file). Either way the weights are adapted to the model medlite builds:

- **input channels**: timm's rule: for 1-channel input the first conv's RGB kernels are summed
  (``timm.models.adapt_input_conv``), so a grey image gives what the RGB network saw for R=G=B;
- **classes**: a classifier whose shape does not match ``num_classes`` is dropped and the
  model's freshly initialised one is kept (a matching classifier, e.g. from a medlite run, loads);
- **input size**: attention-bias tables that depend on the token grid (LeViT, EfficientFormerV2,
  EfficientViT-M) are resized as timm resizes them (bicubic on the table).

Everything else must match exactly (a strict load), so a file for another architecture fails with a
message instead of silently leaving the model random.

Normalisation: ImageNet weights expect the inputs normalised as they were in training, so with
``model.pretrained=true`` (and ``data.mean``/``data.std`` left null) the run's preprocessing uses
the checkpoint's own mean and std from timm's ``pretrained_cfg`` (:func:`pretrained_normalisation`;
averaged over RGB for 1-channel input, matching the summed first-conv kernels), and warns when
timm records none. The numbers reach results.json, the model card and the ONNX metadata.

Offline behaviour: weights already in the Hugging Face or torch hub cache load without any network
access. Otherwise the hub host is probed with a short timeout first; without network the call fails
at once with a :class:`~medlite.errors.ConfigError` that says how to use ``model.pretrained_file``
(timm itself would retry the download for about a minute before failing).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from medlite.errors import ConfigError

log = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to the weights host before declaring "no network".
PROBE_TIMEOUT_S = 4.0
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in order
_TRUE = ("1", "true", "yes", "on")


def create_pretrained(
    build: Callable[..., nn.Module],
    arch: str,
    num_classes: int,
    pretrained_file: str | os.PathLike | None = None,
) -> nn.Module:
    """Build a timm model with pretrained weights.

    ``build(**timm_kwargs)`` must call ``timm.create_model(arch, ...)`` with medlite's
    ``num_classes``/``in_chans``/``img_size``/kwargs plus the given keyword arguments.
    """
    if pretrained_file is not None:
        state_dict = load_weights_file(pretrained_file)
        source = f"model.pretrained_file={pretrained_file}"
    else:
        state_dict, source = load_hub_weights(arch)
    target = build(pretrained=False)  # randomly initialised: target shapes and a fresh classifier
    state_dict = adapt_state_dict(state_dict, target, arch)
    # timm's own loader then adapts the first conv to in_chans and loads strictly. num_classes and
    # label_offset are overlaid so that it keeps the classifier prepared above instead of dropping it
    # (and loading non-strictly, which would hide a file for another architecture).
    overlay = {"state_dict": state_dict, "num_classes": num_classes, "label_offset": 0}
    try:
        model = build(pretrained=True, pretrained_cfg_overlay=overlay)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        detail = _mismatch_summary(state_dict, target) or str(err)[:600]
        raise ConfigError(
            f"the weights from {source} do not fit timm's {arch!r} (weights of another "
            f"architecture or variant?): {detail}"
        ) from None
    for attr in ("pretrained_cfg", "default_cfg"):  # keep no reference to the loaded tensors
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict):
            cfg.update(state_dict=None, file=str(pretrained_file) if pretrained_file else None)
            cfg.update(num_classes=target.pretrained_cfg.get("num_classes"))
    log.info("loaded pretrained weights for %s from %s", arch, source)
    return model


def pretrained_normalisation(arch: str) -> tuple[list[float], list[float]] | None:
    """The RGB ``(mean, std)`` timm's default pretrained checkpoint of ``arch`` was trained with
    (its ``pretrained_cfg``; no download), or None with a warning when timm records none."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    mean, std = (getattr(cfg, "mean", None), getattr(cfg, "std", None)) if cfg else (None, None)
    if not mean or not std or len(mean) != len(std):
        log.warning(
            "timm records no input normalisation for %r's pretrained weights; inputs use "
            "data.mean/data.std (default 0.5): set them to what the weights were trained with",
            arch,
        )
        return None
    return [float(m) for m in mean], [float(s) for s in std]


def load_weights_file(
    path: str | os.PathLike, what: str = "model.pretrained_file"
) -> dict[str, torch.Tensor]:
    """A state_dict from a local ``.safetensors`` file or a ``torch.save``d (checkpoint) dict."""
    p = Path(path).expanduser()
    what = f"{what}={str(path)!r}"
    if not p.is_file():
        where = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(
            f"{what} {where}; give the path of a weights file "
            "(.safetensors, or a .pth/.pt/.bin/.ckpt saved with torch.save)"
        )
    from timm.models import load_state_dict

    try:
        state_dict = load_state_dict(str(p), use_ema=True, weights_only=True)
    except Exception as err:  # unreadable, not a tensor file, or pickled non-tensor objects
        raise ConfigError(
            f"cannot read weights from {what}: "
            f"{type(err).__name__}: {err}. Save the model's state_dict "
            "(torch.save(model.state_dict(), path)) or a .safetensors file."
        ) from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ConfigError(f"{what} holds no state_dict of tensors")
    return dict(state_dict)


def load_hub_weights(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """timm's default pretrained weights for ``arch`` and where they came from: the local cache if
    they are there, else a download; without network a ConfigError at once."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    hf_id = cfg.hf_hub_id if cfg is not None else None
    url = cfg.url if cfg is not None else None
    if not hf_id and not url:
        raise ConfigError(
            f"timm has no pretrained weights for {arch!r}; set model.pretrained=false, or pass "
            "your own with model.pretrained_file=<path>"
        )
    cached = _cached_file(hf_id, cfg.hf_hub_filename, url)
    if cached is not None:
        log.info("pretrained weights for %s from the local cache: %s", arch, cached)
        return load_weights_file(cached, what="the cached hub file"), str(cached)

    if hf_id:
        repo = hf_id.split("@")[0]
        endpoint, source = _hf_endpoint(), f"{_hf_endpoint()}/{repo}"
        filename = cfg.hf_hub_filename or _HF_FILENAMES[0]
        fetch = f"`hf download {repo} {filename}`, or from {source}"
    else:
        endpoint, source = url, url
        filename = Path(urlparse(url).path).name
        fetch = url
    how = (
        f"Download the weights on a machine with network access ({fetch}), copy the file here "
        f"and pass model.pretrained_file=/path/to/{filename}; or train from scratch with "
        "model.pretrained=false."
    )
    if _offline_env():
        raise ConfigError(
            f"model.pretrained=true: timm's weights for {arch!r} are not in the local cache and "
            f"HF_HUB_OFFLINE is set. {how}"
        )
    host = urlparse(endpoint).hostname or endpoint
    if not _reachable(endpoint):
        raise ConfigError(
            f"model.pretrained=true: timm's weights for {arch!r} ({source}) are not in the local "
            f"cache and {host} cannot be reached within {PROBE_TIMEOUT_S:g} s (no network?). {how}"
        )
    try:
        if hf_id:
            from timm.models import load_state_dict_from_hf

            if cfg.hf_hub_filename:
                state_dict = load_state_dict_from_hf(hf_id, cfg.hf_hub_filename)
            else:
                state_dict = load_state_dict_from_hf(hf_id, weights_only=True)
        else:
            state_dict = torch.hub.load_state_dict_from_url(
                url, map_location="cpu", weights_only=True
            )
    except Exception as err:  # network, HTTP, cache-permission errors
        raise ConfigError(
            f"model.pretrained=true: downloading timm's weights for {arch!r} from {source} "
            f"failed: {type(err).__name__}: {err}. {how}"
        ) from None
    return dict(state_dict), source


def adapt_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, arch: str = ""
) -> dict[str, torch.Tensor]:
    """Bring a (timm-format) state_dict towards ``model``: strip a Lightning ``model.`` prefix,
    keep the model's own classifier where the saved one has another shape (or is absent), and
    resize grid-dependent attention-bias tables. The first conv is left to timm's adaptation."""
    target = model.state_dict()
    sd = dict(state_dict)
    if not any(k in target for k in sd) and any(k.startswith("model.") for k in sd):
        # a medlite (Lightning) checkpoint: the network is the module's ``model`` attribute
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}

    classifiers = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    replaced = []
    for name in classifiers:
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in target and (key not in sd or sd[key].shape != target[key].shape):
                sd[key] = target[key]
                replaced.append(key)
            elif key not in target:
                sd.pop(key, None)  # e.g. a model built without a classifier
    if replaced:
        log.info("%s: classifier re-initialised (%s)", arch, ", ".join(replaced))

    from timm.layers import resize_rel_pos_bias_table_levit

    for key, value in list(sd.items()):
        if key not in target or value.shape == target[key].shape:
            continue
        want = target[key]
        if key.endswith("attention_bias_idxs"):  # index buffers follow the model's grid
            sd[key] = want
        elif key.endswith("attention_biases") and value.ndim == 2 and want.ndim == 2:
            if value.shape[0] == want.shape[0]:  # (heads, tokens): resize the token grid
                sd[key] = resize_rel_pos_bias_table_levit(value.T, want.shape[::-1]).T.contiguous()
    return sd


def _mismatch_summary(state_dict: dict[str, torch.Tensor], model: nn.Module) -> str:
    """A short account of how a state_dict differs from a model's (first few keys of each kind)."""
    target = model.state_dict()
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv") or ()
    adapted = {f"{c}.weight" for c in ((first,) if isinstance(first, str) else first)}

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in state_dict and state_dict[k].shape != target[k].shape and k not in adapted
    ]
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of the model's {len(target)} tensors missing ({few(missing)})"
        )
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} with another shape (file vs model: {few(shapes)})")
    return "; ".join(parts)


def _cached_file(hf_id: str | None, hf_filename: str | None, url: str | None) -> Path | None:
    """The weights file in the Hugging Face hub cache or timm's torch-hub cache, if present."""
    if hf_id:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
            pass
        else:
            repo, _, revision = hf_id.partition("@")
            for filename in (hf_filename,) if hf_filename else _HF_FILENAMES:
                found = try_to_load_from_cache(
                    repo, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision or None
                )
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return path
    return None


def _hf_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _offline_env() -> bool:
    if any(
        os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _reachable(url: str, timeout: float | None = None) -> bool:
    """Whether a TCP connection to ``url``'s host (or the HTTPS proxy) opens within ``timeout``.

    DNS lookups ignore socket timeouts, so the probe runs in a daemon thread that is abandoned
    when the time is up."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme != "http" else 80)
    if not host:
        return False
    proxy = urllib.request.getproxies().get(parsed.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or 80
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="medlite-weights-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
