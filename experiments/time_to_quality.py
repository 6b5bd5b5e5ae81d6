"""Time to quality from recorded quality-table runs: when each run's validation NDCG@10 first reached a target.

The target is a reference run's best validation NDCG@10 (default: the best SASRec run by validation, which the
target line names with its setting, best epoch and what ended it) or a number. Every run recorded by
`quality_table.py` keeps, per epoch, the wall time since its fit started (validation passes included) and its
validation metrics, so this needs no new training: it reads the JSON files.

    python -m experiments.time_to_quality experiments/results/beauty/quality_beauty_long.json \
        --reference sasrec --out experiments/results/beauty/time_to_quality.md

Wall times come from whatever machine and load the runs had (see each JSON's hardware and load averages); compare
runs that ran side by side.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from experiments.quality_table import label  # rows are named as in the quality tables


def first_reach(run: dict, target: float) -> dict | None:
    """The first epoch record of `run` whose validation NDCG@10 is >= target, or None."""
    return next((e for e in run["history"] if e["val"]["NDCG@10"] >= target), None)


def table(runs: list[dict], target: float, source: str, versus: tuple[str, float] | None = None) -> str:
    """Markdown table: per run, the first epoch and wall time at which validation NDCG@10 reached `target`, with the
    process CPU time where the record has it, and with `versus` = (name, seconds) how many times sooner than that."""
    cpu = any("cpu_seconds" in e for r in runs for e in r["history"])
    head = ["model", "seed", "train mode", "reached at epoch", "wall time to reach (s)"]
    head += ["CPU time to reach (s)"] if cpu else []
    head += [f"times sooner than {versus[0]} ({versus[1]:.0f} s)"] if versus else []
    head += ["best val NDCG@10", "epochs run", "s per epoch"]
    lines = [f"Target: validation NDCG@10 >= {target:.4f} ({source}).", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in runs:
        hit = first_reach(r, target)
        mode = "prefix" if "train_mode: prefix" in r["config"] else "all_positions"
        per_epoch = r["history"][-1]["seconds"] / len(r["history"])
        cells = [label(r), str(r["seed"]), mode]
        cells += [str(hit["epoch"] + 1), f"{hit['seconds']:.0f}"] if hit else ["not reached", "—"]
        if cpu:
            cells.append(f"{hit['cpu_seconds']:.0f}" if hit and "cpu_seconds" in hit else "—")
        if versus:
            cells.append(f"{versus[1] / hit['seconds']:.1f}" if hit else "—")
        cells += [f"{r['val_at_best']['NDCG@10']:.4f}", str(r["epochs_run"]), f"{per_epoch:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="quality_table.py JSON files")
    p.add_argument("--reference", default="sasrec", help="model whose best validation NDCG@10 is the target")
    p.add_argument("--target", type=float, default=None, help="a fixed target instead of --reference")
    p.add_argument("--also", type=float, nargs="*", default=[], help="more fixed targets, one table each")
    p.add_argument("--versus", nargs=2, metavar=("NAME", "SECONDS"), default=None,
                   help="a time to the target measured elsewhere (e.g. RecBole's SASRec): adds how many times sooner "
                        "each run reached it, by wall time")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown to this file")
    args = p.parse_args(argv)

    runs = [r for path in args.results for r in json.loads(path.read_text())["runs"] if r["history"]]
    if args.target is not None:
        target, source = args.target, "fixed"
    else:
        refs = [r for r in runs if r["model"] == args.reference]
        if not refs:
            raise SystemExit(f"no run of {args.reference!r} in {', '.join(map(str, args.results))}")
        ref = max(refs, key=lambda r: r["val_at_best"]["NDCG@10"])
        target = ref["val_at_best"]["NDCG@10"]
        # a best epoch before the last does not mean early stopping: a fixed horizon or a time cap may have ended it
        ended = f", ended by {ref['ended_by']}" if ref.get("ended_by") else ""
        source = (f"best validation NDCG@10 of {label(ref)} (seed {ref['seed']}, "
                  f"best at epoch {ref['best_epoch'] + 1} of {ref['epochs_run']}{ended})")

    versus = (args.versus[0], float(args.versus[1])) if args.versus else None
    tables = [table(runs, target, source, versus)] + [table(runs, t, "fixed", versus) for t in args.also]
    text = "\n\n".join(tables)
    print(text)
    if args.out:
        command = "python -m experiments.time_to_quality " + shlex.join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(f"# Time to quality\n\nCommand: `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
