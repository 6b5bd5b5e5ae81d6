"""What reading a user's whole history through the recurrent state does to test metrics, against the window of the
last max_len items that training and `m2rec test` use.

    python -m experiments.long_history --dataset ml-1m --ckpt runs/ml-1m-m2rec/checkpoints/best.ckpt \\
        --out experiments/results/ml-1m/long_history_ml-1m

For every test user of the dataset's configs (configs/<dataset>.yaml + configs/shared/<dataset>.yaml, plus any
--config), from one checkpoint, nothing trained:
  * window: the module's own test path, `SequentialRecommender.rank_and_top_k` on the test batch (input = the last
    max_len items before the target), so these numbers are `m2rec test`'s;
  * whole: `encoder.encode_state` on every item before the target (the batch's `seen`: the validation item and all
    training items), i.e. the hidden state a server stepping the user's recurrent state from the first interaction
    would hold (the Mamba scales read everything, the Fourier filter its last max_len inputs), ranked by the same
    `chunked_rank_and_top_k` call with the same item table and seen-item masking (`exclude_seen` as configured).
Users whose history fits the window get the same input both ways (their rows differ only by float rounding); the
record gives all users and the users with more than max_len items apart.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from datamodules.splits import collate
from experiments import quality_table
from m2rec_lightning.metrics import RankingMetrics
from m2rec_lightning.ops.chunked_softmax import chunked_rank_and_top_k

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("NDCG@10", "HR@10", "MRR@10", "NDCG@20")


def load(dataset: str, ckpt: Path, extra_configs: list[Path]):
    """The module and datamodule as `m2rec test --config ... --ckpt_path CKPT` builds them, with the checkpoint's
    weights (its item-text table included)."""
    cli = quality_table.build_cli(quality_table.dataset_configs(dataset) + extra_configs,
                                  ["--trainer.accelerator=cpu", "--trainer.logger=false"])
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = cli.model
    model.load_state_dict(checkpoint["state_dict"])
    if model.seen_score is not None:
        raise SystemExit("long_history: models with a seen_score are not supported (its seen set is the window's)")
    return model.eval(), cli.datamodule, checkpoint


@torch.no_grad()
def measure(model, dm, batch_size: int, users: int | None = None) -> dict:
    """Test metrics of the window and of the whole history, for all users and for those longer than max_len (or for
    `users` of them, evenly spaced in history length: a quick run)."""
    dm.setup("test")
    dataset = dm.eval_dataset("test")
    history = dataset.end - dataset.start  # (U,) items before each test target
    order = np.argsort(history, kind="stable")  # similar lengths together: less padding for the whole history
    if users is not None:
        order = order[np.linspace(0, len(order) - 1, min(users, len(order))).round().astype(int)]
    max_len = dm.max_len
    metrics = {(side, group): RankingMetrics((5, 10, 20)) for side in ("window", "whole")
               for group in ("all", "short", "long")}
    table = model.encoder.item_embeddings()
    better = worse = 0  # long users whose target ranks higher / lower with the whole history
    start = time.perf_counter()
    for chunk in np.array_split(order, max(1, len(order) // batch_size)):
        batch = collate(dataset.__getitems__(chunk.tolist()))
        target = batch["target"]
        window, _, _ = model.rank_and_top_k(batch, target, 0)  # m2rec test's ranks
        _, hidden = model.encoder.encode_state(batch["seen"])
        exclude = batch["seen"] if model.hparams.exclude_seen else None
        whole, _, _ = chunked_rank_and_top_k(hidden, table, target, 0, None, None, exclude)
        long = torch.as_tensor(history[chunk] > max_len)
        better += int((whole < window)[long].sum())
        worse += int((whole > window)[long].sum())
        for side, ranks in (("window", window), ("whole", whole)):
            metrics[side, "all"].update(ranks)
            for group, rows in (("short", ~long), ("long", long)):  # short: the same input both ways
                if rows.any():
                    metrics[side, group].update(ranks[rows])
    # a group with no user (a quick run of short users only) has no metrics
    metrics = {key: m for key, m in metrics.items() if m.count > 0}
    out = {"users": len(order), "users_longer_than_max_len": int((history[order] > max_len).sum()), "max_len": max_len,
           "longest_history": int(history[order].max()),
           "long_users_ranked_higher_by_whole": better, "long_users_ranked_lower_by_whole": worse, "seconds": round(time.perf_counter() - start, 1)}
    for (side, group), m in metrics.items():
        out[f"{side}_{group}"] = {k: float(v) for k, v in m.compute().items()}
    return out


def markdown(record: dict) -> str:
    r = record["result"]
    lines = [f"# {record['dataset']}: whole history through the recurrent state vs the last {r['max_len']} items",
             "",
             (f"Generated by `experiments/long_history.py` (see its docstring). Checkpoint `{record['checkpoint']}`: "
              f"{record['training']}."),
             "",
             (f"{r['users']} test users; {r['users_longer_than_max_len']} have more than max_len={r['max_len']} items "
              f"before their test target (longest {r['longest_history']})."),
             "",
             "| users | input | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for group, name in (("all", "all"), ("short", f"history <= {r['max_len']}"), ("long", f"history > {r['max_len']}")):
        for side, label in (("window", f"last {r['max_len']} items (m2rec test)"), ("whole", "whole history")):
            if f"{side}_{group}" in r:
                lines.append(f"| {name} | {label} | " + " | ".join(f"{r[f'{side}_{group}'][m]:.4f}" for m in METRICS)
                             + " |")
    lines += ["", (f"Of the users with history > {r['max_len']}, the whole history ranks the target higher for "
                   f"{r['long_users_ranked_higher_by_whole']} and lower for {r['long_users_ranked_lower_by_whole']}.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=quality_table.DATASETS, default="ml-1m")
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--config", type=Path, action="append", default=[], help="extra config, after the dataset's")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--users", type=int, default=None, help="a quick run on this many test users (default: all)")
    parser.add_argument("--training", default="", help="how the checkpoint was trained, for the record")
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md")
    args = parser.parse_args(argv)
    model, dm, checkpoint = load(args.dataset, args.ckpt, args.config)
    best = next((v for k, v in checkpoint.get("callbacks", {}).items() if "ModelCheckpoint" in k), {})
    training = args.training or (f"epoch {checkpoint['epoch']} (0-based), best val/NDCG@10 "
                                 f"{float(best.get('best_model_score', float('nan'))):.4f}")
    record = {"dataset": args.dataset, "checkpoint": os.path.relpath(args.ckpt, ROOT), "training": training,
              "epoch": checkpoint["epoch"], "global_step": checkpoint["global_step"],
              "exclude_seen": bool(model.hparams.exclude_seen), "result": measure(model, dm, args.batch_size, args.users)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
