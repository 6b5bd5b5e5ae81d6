"""What RecBole-style prefix augmentation costs per epoch against our all-positions training, on Beauty and ML-1M.

`train_mode="all_positions"` gives each user ONE sample (the most recent max_len+1 training items) with a next-item
target at every position; a causal encoder learns from all of them in one pass. `train_mode="prefix"` (RecBole) gives
one sample per training position, each with a single target at its last position. Per epoch this script reports
  * samples, steps at the given batch, and target positions (next-item losses) of each mode, from the datasets;
  * encoder positions processed (samples × max_len: every batch is max_len wide);
  * the epoch's training time, EXTRAPOLATED: `--steps` real training steps per mode on real batches from each mode's
    DataLoader, interleaved (all, prefix, all, prefix, ...), median step time × steps per epoch.
All-positions covers each user's most recent max_len targets per epoch; prefix covers every training target (on
ML-1M, users longer than max_len+1 contribute their older positions only in prefix mode; `train_window=random`
draws a different window each epoch instead, and `train_window=all` tiles the whole history with windows).

    python benchmarks/prefix_vs_all_positions.py --quick
    python benchmarks/prefix_vs_all_positions.py --out benchmarks/results/prefix_vs_all_positions.md

Time to quality (`--time-to-quality TARGET`): fits the model on Beauty in both modes, validating every
`--val-every` training steps, and records the training wall time (validation excluded) at which validation NDCG@10
first reaches TARGET (use SASRec's converged validation NDCG@10 from experiments/results/beauty/quality_beauty.md), or the
best value reached when `--budget-s` runs out first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from throughput import MODELS, build_model, machine, timed_train_step  # noqa: E402

from datamodules import SequenceFile  # noqa: E402

DATASETS = {  # name: (file under the shared data folder, max_len of its config)
    "beauty": ("beauty/Beauty.txt", 50),
    "ml-1m": ("ml-1m/ml-1m.seq.txt", 200),
}
MODES = ("all_positions", "prefix")


def datamodule(dataset: str, mode: str, batch: int, shared: Path, data_dir: Path, max_len: int | None = None,
               **kwargs) -> SequenceFile:
    """The offline SequenceFile datamodule of configs/shared/<dataset>.yaml, without item text."""
    path, default_len = DATASETS[dataset]
    if not (shared / path).exists():
        raise SystemExit(f"{shared / path} not found; pass --shared-data (the folder described in "
                         "../shared/data/README.md)")
    return SequenceFile(path=str(shared / path), data_dir=str(data_dir), max_len=max_len or default_len,
                        batch_size=batch, train_mode=mode, **kwargs)


def epoch_counts(dm: SequenceFile) -> dict:
    """Samples, target positions and encoder positions of one training epoch of `dm`."""
    ds = dm.train_dataset()
    if dm.train_mode == "prefix":
        targets = len(ds)
    else:
        targets = int((np.minimum(ds.train_length, dm.max_len + 1) - 1).sum())
    return dict(samples=len(ds), steps=-(-len(ds) // dm.batch_size), targets=targets,
                encoder_positions=len(ds) * dm.max_len)


def step_times(dms: dict[str, SequenceFile], model_name: str, steps: int, text_dim: int) -> dict[str, list[float]]:
    """Interleaved real training steps (fresh model per mode, same seed) on each mode's own shuffled batches."""
    models, iters, opts, times = {}, {}, {}, {m: [] for m in dms}
    for mode, dm in dms.items():
        # whole padded batches (length_groups=1), as in the recorded results
        models[mode] = build_model(model_name, dm.max_len, dm.num_items, text_dim, "cpu", length_groups=1)
        opts[mode] = torch.optim.Adam(models[mode].parameters(), lr=1e-3)
        iters[mode] = iter(dm.train_dataloader())

    def one(mode: str) -> float:
        return timed_train_step(models[mode], opts[mode], next(iters[mode]))

    for mode in dms:
        one(mode)  # warm-up
    for _ in range(steps):
        for mode in dms:
            times[mode].append(one(mode))
    return times


def epoch_table(args) -> list[str]:
    lines = ["| dataset | max_len | mode | samples / epoch | steps / epoch | target positions / epoch | "
             "encoder positions / epoch | median step s | epoch s (extrapolated) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    factors = []
    for dataset in args.datasets:
        dms = {mode: datamodule(dataset, mode, args.batch, args.shared_data, args.data_dir) for mode in MODES}
        counts = {mode: epoch_counts(dm) for mode, dm in dms.items()}
        times = step_times(dms, args.model, args.steps, args.text_dim)
        epoch_s = {}
        for mode in MODES:
            c, median = counts[mode], statistics.median(times[mode])
            epoch_s[mode] = median * c["steps"]
            lines.append(f"| {dataset} | {dms[mode].max_len} | {mode} | {c['samples']:,} | {c['steps']:,} | "
                         f"{c['targets']:,} | {c['encoder_positions']:,} | {median:.3f} | {epoch_s[mode]:.0f} |")
            print(lines[-1], flush=True)
        a, p = counts["all_positions"], counts["prefix"]
        factors.append(f"| {dataset} | {p['samples'] / a['samples']:.1f}x | {p['targets'] / a['targets']:.2f}x | "
                       f"{epoch_s['prefix'] / epoch_s['all_positions']:.1f}x |")
    return lines + ["", "| dataset | prefix / all_positions: samples (= encoder work) | target positions | "
                        "epoch time (extrapolated) |", "| --- | ---: | ---: | ---: |"] + factors


class Clock(Callback):
    """Training wall time with validation excluded, and val NDCG@10 after each validation; stops at the target or
    when the training time exceeds the budget.

    Args:
        target: validation NDCG@10 to reach.
        budget_s: training seconds after which the fit stops.
    """

    def __init__(self, target: float, budget_s: float):
        self.target, self.budget_s = target, budget_s
        self.train_s, self.history, self._since = 0.0, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._since = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_s += time.perf_counter() - self._since
        if self.train_s > self.budget_s:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        ndcg = float(trainer.callback_metrics["val/NDCG@10"])
        self.history.append((trainer.global_step, round(self.train_s, 1), round(ndcg, 4)))
        print(f"  step {trainer.global_step:6d}  train {self.train_s:7.1f} s  val NDCG@10 {ndcg:.4f}", flush=True)
        if ndcg >= self.target:
            trainer.should_stop = True


def time_to_quality(args) -> list[str]:
    lines = [f"Time to quality on Beauty: {args.model}, batch {args.batch}, validation every {args.val_every} "
             f"steps; target val NDCG@10 = {args.time_to_quality}; budget {args.budget_s:.0f} s of training per mode.",
             "", "| mode | reached | training wall s at target (validation excluded) | steps | best val NDCG@10 |",
             "| --- | --- | ---: | ---: | ---: |"]
    for mode in MODES:
        print(f"time to quality: {mode}", flush=True)
        L.seed_everything(42)
        dm = datamodule("beauty", mode, args.batch, args.shared_data, args.data_dir)
        model = build_model(args.model, dm.max_len, dm.num_items, args.text_dim, "cpu", seed=42)
        model.setup = lambda stage: None  # M2Rec's random text table is in place; the datamodule has no text
        clock = Clock(args.time_to_quality, args.budget_s)
        trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_time=None, val_check_interval=args.val_every,
                            check_val_every_n_epoch=None, callbacks=[clock], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm)
        hit = next((h for h in clock.history if h[2] >= args.time_to_quality), None)
        best = max((h[2] for h in clock.history), default=float("nan"))
        lines.append(f"| {mode} | {'yes' if hit else 'no'} | {hit[1] if hit else f'> {clock.train_s:.0f}'} | "
                     f"{hit[0] if hit else trainer.global_step} | {best:.4f} |")
        lines.append(f"|  | curve (step, train s, NDCG@10) | {clock.history} | | |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--model", default="sasrec", choices=MODELS)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up)")
    p.add_argument("--text-dim", type=int, default=384, help="M2Rec's (random) text table width")
    p.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / "data",
                   help="the datamodules' cache folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (see throughput.py)")
    p.add_argument("--time-to-quality", type=float, default=None, metavar="TARGET",
                   help="also measure training time until Beauty val NDCG@10 >= TARGET in both modes")
    p.add_argument("--val-every", type=int, default=88, help="validation interval in training steps")
    p.add_argument("--budget-s", type=float, default=600.0, help="training time cap per mode for --time-to-quality")
    p.add_argument("--quick", action="store_true", help="batch 64, 2 timed steps")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/prefix_vs_all_positions.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Prefix augmentation vs all-positions training: cost per epoch", "", f"Command: `{command.strip()}`", "",
             f"Machine: {machine('cpu')}; shared with other jobs, so step times are contended (both modes "
             f"interleaved). Model {args.model}, batch {args.batch}, {args.steps} timed steps per mode after one "
             "warm-up; epoch times are EXTRAPOLATED as median step time × steps per epoch.", ""]
    lines += epoch_table(args)
    if args.time_to_quality is not None:
        lines += [""] + time_to_quality(args)
    lines += ["", f"load average at the end: {os.getloadavg()[0]:.1f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
