"""The base of every exported model run by its runtime (ONNX Runtime, OpenVINO, ExecuTorch)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class ExportedModel(nn.Module):
    """An exported file run by its runtime, as an ``nn.Module``: float32 logits on CPU.

    It has no parameters and cannot be trained, so ``profile_model`` reads ``profile_overrides``
    (``params`` and ``macs`` supplied by the creator from the fp32 model, since quantisation does
    not change them, and ``size_mb`` of the files). ``threads=None`` follows
    ``torch.get_num_threads()`` at each call (subclasses reopen the file when it changes), so
    profiling at a given thread count measures the runtime at that count too. Pickling drops the
    runtime's live objects (:attr:`_handles`, with their initial values) and reopens the file.
    """

    _handles: dict[str, object] = {}

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        files: list[Path] | None = None,
        threads: int | None = None,
        params: int | None = None,
        macs: int | None = None,
        what: str = "model",
    ) -> None:
        super().__init__()
        self.path = Path(path)
        files = files or [self.path]
        if not all(f.is_file() for f in files):
            raise FileNotFoundError(f"{what} {self.path} does not exist")
        self.threads = threads
        self.profile_overrides: dict[str, float | int] = {
            "size_mb": sum(f.stat().st_size for f in files) / 2**20
        }
        if params is not None:
            self.profile_overrides["params"] = int(params)
        if macs is not None:
            self.profile_overrides["macs"] = int(macs)
        for name, value in self._handles.items():
            setattr(self, name, value)

    def _wanted_threads(self) -> int:
        return int(self.threads or torch.get_num_threads())

    def _open(self) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.threads}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, **self._handles}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.path.is_file():
            self._open()
