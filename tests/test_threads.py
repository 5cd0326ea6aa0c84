"""threads=auto: torch's threads follow the cores other processes leave free, during training only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medlite.errors import ConfigError
from medlite.threads import LoadMeter, ThreadsFollowLoad, check_threads, idle_threads

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
SPIN = "while True:\n    pass\n"


def test_threads_setting_is_checked():
    assert check_threads("auto") == "auto" and check_threads(None) == "auto"
    assert check_threads(2) == 2 and check_threads("3") == 3
    for bad in (0, -1, "many", 1.5):
        with pytest.raises(ConfigError, match="threads must be auto or a number"):
            check_threads(bad)


class _Spinners:
    """``n`` processes each keeping one core busy, for the length of a ``with`` block. They are
    grandchildren (started by an idle child): this process's own children count as its own
    work (data-loader workers), another program's processes must not."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        starter = f"import subprocess, sys\nfor _ in range({self.n}):\n"
        starter += f"    subprocess.Popen([sys.executable, '-c', {SPIN!r}])\n"
        starter += "import time\ntime.sleep(3600)\n"
        self.proc = subprocess.Popen([sys.executable, "-c", starter], start_new_session=True)
        time.sleep(0.5)  # started and spinning
        return self

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@linux
def test_busy_processes_take_threads_away():
    cpus = os.cpu_count() or 1
    with _Spinners(cpus):  # every core taken by another process: one thread left
        assert idle_threads(limit=cpus, sample_s=0.5) == 1
    assert idle_threads(limit=1, sample_s=0.1) == 1  # never more than the limit


@linux
def test_this_process_own_work_is_not_load():
    """What this process (and its children) computes is subtracted: a training loop busy on its
    own threads must not talk itself down to fewer threads."""
    from medlite.threads import _cpu_jiffies, _own_jiffies

    meter = LoadMeter()
    before, own_before = _cpu_jiffies(), _own_jiffies()
    end = time.perf_counter() + 0.6
    x = 0
    while time.perf_counter() < end:  # one core of our own work
        x += 1
    after, own_after = _cpu_jiffies(), _own_jiffies()
    per_cpu = (after[1] - before[1]) / meter.cpus
    everything = (after[0] - before[0]) / per_cpu
    own = (own_after - own_before) / per_cpu
    others = meter.others_busy()
    # our spinning was counted as ours (a whole core on an idle machine, less when other
    # processes share the cores: the assertions hold on a loaded machine too) ...
    assert own >= 0.4
    # ... and the meter took exactly it out of the machine's busy time
    assert others is not None and others == pytest.approx(max(0.0, everything - own), abs=0.25)


@linux
def test_training_under_load_uses_the_free_cores_and_restores_them(tmp_path):
    """A real (short) fit beside busy processes: each epoch runs with the cores left free, and
    the phase ends with the threads it started with."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)
            )

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = TensorDataset(torch.randn(256, 1, 16, 16), torch.randint(0, 2, (256,)))
    cpus = os.cpu_count() or 1
    old = torch.get_num_threads()
    torch.set_num_threads(cpus)
    follow = ThreadsFollowLoad()
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[follow],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    try:
        with _Spinners(cpus):
            trainer.fit(Tiny(), DataLoader(data, batch_size=32))
        assert follow.history == {
            0: 1,
            1: 1,
            2: 1,
        }  # every core busy elsewhere: one thread per epoch
        assert torch.get_num_threads() == cpus  # restored for profiling and export
    finally:
        torch.set_num_threads(old)
