"""Training throughput of medlite (LightningModule + Trainer) vs a hand-written PyTorch loop.

Same model, data, augmentation, batch size and optimiser, in the same process, alternating
the two so machine noise hits both; prints images/s and the ratio medlite / hand loop.

    python scripts/bench_overhead.py                     # synthetic default set
    python scripts/bench_overhead.py --data breastmnist --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table

from medlite.console import quiet_third_party
from medlite.data.datamodule import DataModule
from medlite.data.sources.medmnist import MedMNISTSource
from medlite.models import create_model
from medlite.modules import module_class

LITECNN = {"widths": [24, 32, 64, 128], "depths": [1, 2, 2], "head_dim": 256}
OPTIM = {"_target_": "torch.optim.AdamW", "lr": 3e-3, "weight_decay": 0.05}


def hand_loop(model: torch.nn.Module, dm: DataModule, epochs: int) -> float:
    task = dm.task
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    model.train()
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            loss = task.loss(model(x), task.targets(y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
    return seen / (time.perf_counter() - start)


class _Throughput(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.seen, self.start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += len(batch[0])

    def on_train_end(self, trainer, pl_module) -> None:
        self.rate = self.seen / (time.perf_counter() - self.start)


def medlite_loop(model: torch.nn.Module, dm: DataModule, epochs: int, logdir: str) -> float:
    module = module_class("cnn")(model, dm.task, optim=OPTIM, scheduler={"name": "cosine"})
    meter = _Throughput()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(logdir, name="", version=""),
        callbacks=[meter],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    trainer.fit(module, datamodule=dm)
    return meter.rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="synthlesion")
    parser.add_argument("--data-dir", default="~/.medmnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_third_party()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

    import tempfile

    dm = DataModule(
        MedMNISTSource(args.data, data_dir=args.data_dir, download=False),
        batch_size=args.batch_size,
        augment={"hflip": 0.5, "rotate": 10, "translate": 0.1, "scale": [0.9, 1.1]},
    )
    dm.setup()
    torch.manual_seed(0)
    base = create_model("litecnn", dm.task.num_outputs, dm.in_chans, dm.size, **LITECNN)
    hand, lite = [], []
    with tempfile.TemporaryDirectory() as logdir:
        hand_loop(copy.deepcopy(base), dm, 1)  # warm-up (allocator, thread pools)
        for _ in range(args.repeats):
            hand.append(hand_loop(copy.deepcopy(base), dm, args.epochs))
            lite.append(medlite_loop(copy.deepcopy(base), dm, args.epochs, logdir))
    table = Table(
        title=f"training throughput, litecnn on {args.data} ({dm.size} px), batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    table.add_column("loop")
    table.add_column("images/s (best)", justify="right")
    table.add_column("images/s (median)", justify="right")
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    table.add_row("hand-written PyTorch", f"{max(hand):.0f}", f"{med(hand):.0f}")
    table.add_row("medlite (Lightning)", f"{max(lite):.0f}", f"{med(lite):.0f}")
    table.add_row(
        "ratio medlite / hand", f"{max(lite) / max(hand):.3f}", f"{med(lite) / med(hand):.3f}"
    )
    Console().print(table)


if __name__ == "__main__":
    main()
