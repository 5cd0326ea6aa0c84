"""Where a job of a parallel multirun runs: its share of CPU threads and, with several GPUs,
its own GPU.

Hydra's joblib launcher starts N jobs at once but places none of them: every job would start
as many torch threads as the machine has cores (N-fold oversubscription, each job slower than
running alone) and every GPU job would land on GPU 0. The pipeline calls :func:`place_job` first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class Placement:
    parallel_jobs: int
    job_num: int
    threads: int
    gpu: int | None  # CUDA device index, None: CPU or a single GPU left to Lightning


def plan_placement(
    parallel_jobs: int, job_num: int, cpu_count: int, n_gpus: int, wants_gpu: bool
) -> Placement:
    """Job ``job_num`` of ``parallel_jobs`` running at once: cores split evenly (at least one
    thread each), GPUs round-robin by job number (jobs run in order, so the k-th running job
    lands on its own GPU when #GPUs >= parallel_jobs)."""
    parallel_jobs = max(1, int(parallel_jobs))
    threads = max(1, cpu_count // parallel_jobs)
    gpu = job_num % n_gpus if (wants_gpu and n_gpus > 1) else None
    return Placement(parallel_jobs, job_num, threads, gpu)


def _job_num() -> int:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return int(HydraConfig.get().job.get("num") or 0)
    except Exception:  # noqa: BLE001 - outside Hydra there is one job
        pass
    return 0


def _wants_gpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def place_job(cfg: DictConfig) -> Placement | None:
    """Apply the placement of this job when ``parallel_jobs`` > 1 (``launcher=joblib``): set
    torch's threads and pin ``trainer.devices`` to one GPU. Returns it (for results.json)."""
    parallel = int(cfg.get("parallel_jobs") or 1)
    if parallel <= 1:
        return None
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    placement = plan_placement(parallel, _job_num(), os.cpu_count() or 1, n_gpus, _wants_gpu(cfg))
    torch.set_num_threads(placement.threads)
    if placement.gpu is not None:
        with open_dict(cfg):
            cfg.trainer.devices = [placement.gpu]
    log.info(
        "job %d of %d in parallel: %d CPU thread(s)%s",
        placement.job_num,
        parallel,
        placement.threads,
        f", GPU {placement.gpu}" if placement.gpu is not None else "",
    )
    return placement


def placement_record(placement: Placement | None) -> dict:
    record = {"pid": os.getpid(), "threads": torch.get_num_threads()}
    if placement is not None:
        record.update(asdict(placement))
    return record
