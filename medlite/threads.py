"""CPU threads that follow the machine's load, so training degrades gracefully on a shared machine.

Measured (``scripts/bench_threads.py``, LiteCNN, 2-core machine): with one other busy process,
torch at 2 threads trained at half the speed of 1 thread and ran batch-1 inference 3x slower
(OpenMP threads waiting on a core the other process holds). ``OMP_WAIT_POLICY=PASSIVE`` removes
the training loss under load but makes idle batch-1 inference 2.9x slower, so no single
OpenMP setting is right for both. What is right is the number of threads: as many as there are
free cores. With ``threads: auto`` (the default), each training phase measures at the start of
every epoch how much CPU *other* processes used since the last check (``/proc/stat`` minus this
process and its children), and sets torch's threads to the cores they left free (at least 1, at
most the job's share); the setting is restored when the phase ends, so profiling and export run
as configured. On an idle machine nothing changes. Linux only (elsewhere: as configured).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from medlite.errors import ConfigError

log = logging.getLogger(__name__)


def check_threads(value) -> str | int:
    """``threads`` config: ``auto`` or a positive number of threads."""
    if value is None or str(value) == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(value).strip():
        raise ConfigError(f"threads must be auto or a number of threads >= 1, got {value!r}")
    return n


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _ticks_of(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0


def _own_jiffies() -> int:
    """CPU ticks of this process and its live children (e.g. data-loader workers)."""
    total = _ticks_of("self")
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                total += sum(_ticks_of(pid) for pid in f.read().split())
    except OSError:
        pass
    return total


@dataclass
class _Sample:
    busy: int
    total: int
    own: int


class LoadMeter:
    """CPUs kept busy by other processes between two calls of :meth:`others_busy`."""

    def __init__(self) -> None:
        self.cpus = os.cpu_count() or 1
        self._last = self._sample()

    def _sample(self) -> _Sample | None:
        cpu = _cpu_jiffies()
        return None if cpu is None else _Sample(cpu[0], cpu[1], _own_jiffies())

    def others_busy(self) -> float | None:
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now.total <= last.total:
            return None
        per_cpu = (now.total - last.total) / self.cpus
        others = (now.busy - last.busy) - (now.own - last.own)
        return max(0.0, others / per_cpu)


def free_cpus(limit: int, meter: LoadMeter) -> int | None:
    """Threads to use: the cores other processes left free (rounded to the nearest), within
    ``[1, limit]``; None when the load can't be read."""
    busy = meter.others_busy()
    if busy is None:
        return None
    return max(1, min(limit, meter.cpus - int(busy + 0.5)))


def idle_threads(limit: int, sample_s: float = 0.2) -> int | None:
    """:func:`free_cpus` over a short sample now (while this process waits)."""
    meter = LoadMeter()
    time.sleep(sample_s)
    return free_cpus(limit, meter)


class ThreadsFollowLoad(pl.Callback):
    """Each training epoch starts with as many torch threads as other processes left cores
    free (see the module docstring); the phase ends with the threads it started with."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.meter: LoadMeter | None = None
        self.start_threads = 0
        self.history: dict[int, int] = {}  # epoch -> threads it trained with

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start_threads = torch.get_num_threads()
        self.limit = self.limit or self.start_threads
        if trainer.world_size > 1:  # DDP places its own threads
            return
        n = idle_threads(self.limit, sample_s=0.1)  # a short look before the first epoch
        if n is not None and n != self.start_threads:
            log.info(
                "other processes keep %d core(s) busy: %d torch thread(s)", os.cpu_count() - n, n
            )
            torch.set_num_threads(n)
        self.meter = LoadMeter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.meter is None:
            return
        if not self.history:  # the first epoch of this fit: just measured by on_fit_start
            self.history[trainer.current_epoch] = torch.get_num_threads()
            return
        n = free_cpus(self.limit, self.meter)
        if n is not None and n != torch.get_num_threads():
            log.info(
                "other processes keep %d core(s) busy: %d torch thread(s)", self.meter.cpus - n, n
            )
            torch.set_num_threads(n)
        self.history[trainer.current_epoch] = torch.get_num_threads()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.start_threads:
            torch.set_num_threads(self.start_threads)
