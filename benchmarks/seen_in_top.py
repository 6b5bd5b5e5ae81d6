"""How much of an encoder's top 10 its own input fills: the input's items among the top-10 test recommendations of
search winners' checkpoints, ranked by the encoder's scores alone and with the learned seen-item score (`seen_bias`)
added, as the model ranks by default.

Neither Beauty nor ML-1M has a user with an item twice, so every input item in a top 10 is a slot lost. An encoder
with tied item embeddings whose output keeps the last input item's embedding (a residual path) scores that item high
by construction; the learned score can only help as much as the encoder wastes slots this way. With
`seen_bias_detach` the encoder's loss is the one without the score, so "encoder alone" is the encoder such a model
trains.

    python benchmarks/seen_in_top.py --dataset beauty --min-seeds 1 --from-search \\
        benchmarks/results/search_beauty_sasrec_seen_bias_detach.json \\
        benchmarks/results/search_beauty_m2rec_sum_gate_gated_10ep_seen_bias_detach.json \\
        --out benchmarks/results/seen_in_top_beauty

Each record's validation winner (as `quality_table.py --from-search` picks it), every seed's best checkpoint, the
test split; nothing is trained. Rows are merged into OUT.json as in `exclude_seen.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exclude_seen  # noqa: E402
import quality_table  # noqa: E402

from m2rec_lightning.metrics import RankingMetrics, mask_scores, pessimistic_rank  # noqa: E402
from m2rec_lightning.module import seen_items  # noqa: E402

K = 10
COLUMNS = ("NDCG@10", "HR@10", "input items in top 10", "last input item in top 10")


@torch.no_grad()
def top_k_stats(model, loader) -> dict[str, dict[str, float]]:
    """Test metrics and top-K contents, ranked by the encoder's scores alone ("encoder") and, when the model has a
    seen score, with it added ("with score")."""
    bias = 0.0 if model.seen_bias is None else float(model.seen_bias)
    ways = ["encoder"] + ([] if model.seen_bias is None else ["with score"])
    metrics = {way: RankingMetrics((K,)) for way in ways}
    counts = {way: torch.zeros(2, dtype=torch.float64) for way in ways}  # input items in top K, last item in top K
    users = 0
    for batch in loader:
        input_ids, target = batch["input_ids"], batch["target"]
        scored = model(input_ids).float()  # (B, N+1), the seen score included when the model has one
        seen = seen_items(input_ids, scored.size(1))  # (B, N+1)
        last = input_ids.gather(1, ((input_ids > 0).sum(1) - 1).clamp(min=0)[:, None])  # (B, 1): right-padded rows
        for way in ways:
            scores = mask_scores(scored - bias * seen if way == "encoder" else scored, target)
            metrics[way].update(pessimistic_rank(scores, target))
            top = scores.topk(K, dim=1).indices  # (B, K)
            in_top = seen[:, 1:].gather(1, (top - 1).clamp(min=0)) & (top > 0)  # column 0 is masked, never in top
            counts[way] += torch.stack([in_top.sum(1).double().sum(), (top == last).any(1).double().sum()])
        users += len(target)
    out = {}
    for way in ways:
        values = metrics[way].compute()
        out[way] = {"NDCG@10": float(values["NDCG@10"]), "HR@10": float(values["HR@10"]),
                    "input items in top 10": float(counts[way][0] / users),
                    "last input item in top 10": float(counts[way][1] / users)}
    return {"seen_bias": bias if model.seen_bias is not None else None, **out}


def measure(search_json: Path, args: argparse.Namespace) -> list[dict]:
    search = json.loads(search_json.read_text())
    if search["dataset"] != args.dataset:
        raise ValueError(f"{search_json} is a search on {search['dataset']}, not {args.dataset}")
    setting, points = quality_table.search_winner(search["points"], args.min_seeds, search_json, args.search_seeds)
    rows = []
    for point in points:
        checkpoint = quality_table.ROOT / point["best_checkpoint"]
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{search_json}: checkpoint {checkpoint} of {setting} seed {point['seed']} is gone")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
            config.write(point["config"])
            config.flush()
            cli = quality_table.build_cli([Path(config.name)], ["--trainer.logger=false"])
        model, dm = cli.model, cli.datamodule
        if model.hparams.seen_scope != "input":
            raise ValueError(f"{search_json}: {setting} scores the user's whole history as seen (seen_scope: "
                             f"{model.hparams.seen_scope}); this diagnostic counts the input window's items only")
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
        model.eval()
        dm.prepare_data()
        dm.setup("test")
        stats = top_k_stats(model, dm.test_dataloader())
        print(f"== {point['model']} seed {point['seed']}: {stats}", flush=True)
        rows.append({"label": quality_table.label(point), "seed": point["seed"],
                     "search": os.path.relpath(search_json, quality_table.ROOT), **stats})
    return rows


def markdown(rows: list[dict], dataset: str) -> str:
    lines = [f"# {dataset}: the input's own items in the top 10", "",
             "Generated by `benchmarks/seen_in_top.py`: each search record's validation winner, its best checkpoint per "
             "seed, the test split, ranked by the encoder's scores alone and with the learned seen-item score added "
             "(the model's default ranking). No user has an item twice, so every input item in a top 10 is a slot "
             "lost.", "",
             "| row | seed | seen score | " + " | ".join(f"{c} ({w})" for w in ("encoder", "with score") for c in COLUMNS)
             + " |", "|" + "---|" * (3 + 2 * len(COLUMNS))]
    for r in rows:
        cells = [f"{r[w][c]:.4f}" if w in r else "" for w in ("encoder", "with score") for c in COLUMNS]
        bias = "" if r["seen_bias"] is None else f"{r['seen_bias']:.2f}"
        lines.append(f"| {r['label']} | {r['seed']} | {bias} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    return exclude_seen.run(argv, __doc__, measure, markdown, accelerator=False)  # the model runs here, on the CPU


if __name__ == "__main__":
    main()
