"""Lightning's checkpoint writer, made atomic in the checkpoint's own folder.

Lightning (2.6) serialises a checkpoint in memory, writes it to a temporary file in ``/tmp`` and
moves it over: across file systems that move is a copy, which a full disk or a kill leaves
truncated under the final name (``last.ckpt``, what ``resume=`` continues from), and the file
gets mode 0600. Kept out of :mod:`medlite.checkpoints` so that reading a model (``predict.py``)
does not import Lightning.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from medlite import atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write every Lightning checkpoint through :func:`medlite.atomic.torch_save`; read every
    one weights-only, whatever torch's default or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say
    (``resume=`` may point at a run folder someone sent)."""

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic.torch_save(checkpoint, path)
