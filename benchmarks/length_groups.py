"""What `SequentialRecommender(length_groups=G)` saves: training steps on real batches, G = 1 against G > 1.

With G > 1 the module sorts each batch by sequence length, splits it into G groups and runs the encoder on each group
cut to its longest sequence (exact: tests/test_module.py checks loss, gradients and scores against G = 1). Batches
are the datamodule's own (train_mode all_positions, shuffled, batch 256), so the saving is the one a real epoch sees:
on Beauty 13 % of the 50 positions of an average row are real items, on ML-1M (max_len 200) most rows are full.

Timing: one model per (model, G), all built from the same seed; every round draws the next real batch and runs it
through every G in turn (interleaved, so load from other processes hits all of them alike); medians over `--steps`
rounds after one warm-up round. A step = encode + full-softmax loss + backward + Adam step, as in training.

    python benchmarks/length_groups.py --quick
    python benchmarks/length_groups.py --out benchmarks/results/length_groups.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
from prefix_vs_all_positions import datamodule, epoch_counts  # noqa: E402
from throughput import MODELS, build_model, machine, timed_train_step  # noqa: E402


def step_times(dm, model_name: str, groups: list[int], steps: int, text_dim: int) -> dict[int, list[float]]:
    models, opts = {}, {}
    for g in groups:
        models[g] = build_model(model_name, dm.max_len, dm.num_items, text_dim, "cpu", length_groups=g)
        opts[g] = torch.optim.Adam(models[g].parameters(), lr=1e-3)
    batches = iter(dm.train_dataloader())
    times: dict[int, list[float]] = {g: [] for g in groups}
    for round_ in range(steps + 1):
        batch = next(batches)
        for g in groups:
            seconds = timed_train_step(models[g], opts[g], batch)
            if round_ > 0:  # round 0 warms up
                times[g].append(seconds)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["beauty", "ml-1m"], choices=["beauty", "ml-1m"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--groups", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=8, help="timed rounds (real batches) per model")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--text-dim", type=int, default=384, help="width of M2Rec's random frozen text table")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shared-data", type=Path, default=BENCH.parent.parent / "shared" / "data")
    p.add_argument("--data-dir", type=Path, default=BENCH.parent / "data")
    p.add_argument("--quick", action="store_true", help="Beauty, 3 rounds")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.steps = ["beauty"], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    if 1 not in args.groups:
        args.groups = [1] + args.groups

    lines = ["| dataset | model | real positions | G | median s/step | speed-up vs G=1 |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    for dataset in args.datasets:
        dm = datamodule(dataset, "all_positions", args.batch, args.shared_data, args.data_dir)
        dm.prepare_data()
        dm.setup("fit")
        counts = epoch_counts(dm)
        real = f"{counts['targets'] / counts['encoder_positions']:.1%}"  # one input position per target
        for model_name in args.models:
            times = step_times(dm, model_name, args.groups, args.steps, args.text_dim)
            base = statistics.median(times[1])
            for g in args.groups:
                median = statistics.median(times[g])
                lines.append(f"| {dataset} | {model_name} | {real} | {g} | {median:.3f} | {base / median:.2f}x |")
                print(lines[-1], flush=True)
    header = [
        "# length_groups: encoder work on padding, skipped exactly", "",
        f"Command: `python benchmarks/length_groups.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        f"Machine: {machine('cpu')}. Batch {args.batch}, medians of {args.steps} interleaved rounds on real "
        "training batches (all_positions). 'real positions' = share of non-padding input positions over a whole training epoch.", "",
    ]
    if args.out:
        args.out.write_text("\n".join(header + lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
