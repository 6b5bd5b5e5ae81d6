"""The data loader's share of a training step and of an evaluation step, on the real Beauty and ML-1M data.

For each dataset and split, one loop draws a batch from the datamodule's own DataLoader (the one Lightning uses:
`train_dataloader()` / `val_dataloader()`, num_workers=0, so every microsecond of loading is on the step's critical
path) and then runs the step on it: train = forward + loss + backward + Adam; val = `score` + `pessimistic_rank`.
Loader time and step time are measured separately per batch; the share is median loader / (median loader + median
step). With workers (`--num-workers`), loading overlaps the step and the share is only the wait for the next batch.

    python benchmarks/loader_share.py --quick
    python benchmarks/loader_share.py --out benchmarks/results/loader_share.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from prefix_vs_all_positions import DATASETS, MODES, datamodule  # noqa: E402
from throughput import MODELS, build_model, machine  # noqa: E402

from m2rec_lightning.metrics import pessimistic_rank  # noqa: E402


def share(loader, step, batches: int) -> tuple[float, float]:
    """Median seconds per batch spent in the loader and in `step(batch)`, over `batches` batches after one warm-up."""
    it = iter(loader)
    step(next(it))
    load_s, step_s = [], []
    for _ in range(batches):
        start = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            break
        load_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        step(batch)
        step_s.append(time.perf_counter() - start)
    return statistics.median(load_s), statistics.median(step_s)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--model", default="m2rec", choices=MODELS)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=1024)
    p.add_argument("--batches", type=int, default=5, help="timed batches per loop (after one warm-up)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--text-dim", type=int, default=384, help="M2Rec's (random) text table width")
    p.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (see throughput.py)")
    p.add_argument("--quick", action="store_true", help="batch 32, eval batch 128, 3 batches")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.eval_batch, args.batches = 32, 128, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = ["| dataset | loop | batch | loader ms / batch | step ms / batch | loader share |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for dataset in args.datasets:
        for mode in MODES:
            dm = datamodule(dataset, mode, args.batch, args.shared_data, args.data_dir,
                            eval_batch_size=args.eval_batch, num_workers=args.num_workers)
            model = build_model(args.model, dm.max_len, dm.num_items, args.text_dim, "cpu")
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)

            def train(batch):
                model.train()
                opt.zero_grad(set_to_none=True)
                model.loss(model.encoder(batch["input_ids"]), batch["target_ids"]).backward()
                opt.step()

            def evaluate(batch):
                model.eval()
                with torch.inference_mode():
                    pessimistic_rank(model.score(batch, batch["target"]), batch["target"])

            loops = [(f"train ({mode})", dm.train_dataloader(), train, args.batch)]
            if mode == "all_positions":  # validation batches do not depend on the train mode
                loops.append(("validation", dm.val_dataloader(), evaluate, args.eval_batch))
            for name, loader, step, batch_size in loops:
                load_s, step_s = share(loader, step, args.batches)
                rows.append(f"| {dataset} | {name} | {batch_size} | {load_s * 1e3:.2f} | {step_s * 1e3:.1f} | "
                            f"{100 * load_s / (load_s + step_s):.2f} % |")
                print(rows[-1], flush=True)
    command = "python benchmarks/loader_share.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "# Data loader's share of a step", "", f"Command: `{command.strip()}`", "",
        f"Machine: {machine('cpu')}; shared with other jobs (contended). Model {args.model} (d=64), "
        f"num_workers={args.num_workers}, medians over {args.batches} batches after one warm-up. Loader = drawing "
        "one batch from the datamodule's DataLoader (vectorised numpy gathers + tensor conversion); step = the "
        "training step or the full-ranking evaluation step on it.", ""] + rows) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
