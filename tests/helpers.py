"""Compose medlite configs in-process (no subprocess start-up) for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from medlite.compress import RunContext

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def make_cfg(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def model_and_context(
    tmp_path: Path, overrides: list[str] = (), seed: int | None = None
) -> tuple[torch.nn.Module, RunContext]:
    """The configured model and the RunContext a compression step gets, on real config."""
    from medlite.pipeline import build_datamodule, build_model

    cfg = make_cfg(tmp_path, list(overrides))
    dm = build_datamodule(cfg)
    dm.setup()
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(cfg.model, dm.task.num_outputs, dm.in_chans, dm.preprocess.input_size)
    return model, RunContext(cfg=cfg, datamodule=dm, output_dir=tmp_path)


def wandb_offline_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``), read from disk.

    wandb 0.31 writes no config.yaml or summary for offline runs and has no Python reader; the
    file is a LevelDB-style log (32 KiB blocks of crc/length/type-framed chunks) of ``Record``s.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pos, block, chunk = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
            chunk = b""
    return records
