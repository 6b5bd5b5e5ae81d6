"""``m2rec stats --config cfg.yaml [--config override.yaml ...]``: prepare a dataset and report its statistics.

Reads only the ``data:`` section of the same YAML files ``m2rec fit`` takes (later files override earlier ones, as in
LightningCLI), prints the counts and what every filter removed, and saves them as ``stats.json`` beside the
processed data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from .base import SequentialDataModule
from .cache import write_json


def load_datamodule(config_paths: list[str | Path]) -> SequentialDataModule:
    """Instantiate the datamodule of the ``data:`` sections of the given YAML files.

    jsonargparse merges the sections in order exactly as LightningCLI does (a later class_path replaces the class
    but keeps the init_args the new class also accepts) and type-checks every argument.
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(SequentialDataModule, "data", required=True)
    args = []
    for path in config_paths:
        with open(path, encoding="utf-8") as f:
            section = (yaml.safe_load(f) or {}).get("data")
        if section is not None:
            args += ["--data", json.dumps(section)]
    if not args:
        raise ValueError(f"no 'data:' section in {[str(p) for p in config_paths]}")
    config = parser.parse_args(args)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    return instantiate(config).data


def format_stats(stats: dict) -> str:
    lines = [
        f"dataset            {stats['dataset']}",
        f"users              {stats['users']:,}",
        f"items              {stats['items']:,}",
        f"interactions       {stats['interactions']:,}",
        f"sequence length    mean {stats['mean_sequence_length']:.2f}, median {stats['median_sequence_length']:g}, "
        f"min {stats['min_sequence_length']}, max {stats['max_sequence_length']}",
        f"sparsity           {stats['sparsity']:.4%}",
        f"raw                {stats['raw_users']:,} users, {stats['raw_items']:,} items, "
        f"{stats['raw_interactions']:,} interactions",
        f"duplicates         {stats['duplicates']:,} (dropped {stats['duplicates_dropped']:,})",
    ]
    kcore = stats["kcore"]
    rounds = kcore["rounds"]
    lines.append(f"k-core             users >= {kcore['min_user_interactions']}, items >= "
                 f"{kcore['min_item_interactions']}: {len(rounds)} round(s) removing "
                 f"{sum(r['interactions_removed'] for r in rounds):,} interactions")
    for i, r in enumerate(rounds, 1):
        lines.append(f"  round {i:<12} -{r['users_removed']:,} users, -{r['items_removed']:,} items, "
                     f"-{r['interactions_removed']:,} interactions")
    lines.append(f"short users (< 3)  {stats['short_users_removed']:,} removed "
                 f"({stats['short_user_interactions_removed']:,} interactions)")
    lines.append(f"no train pairs     {stats['users_without_train_pairs']:,} users (train part < 2 items)")
    if "tied_interactions" in stats:
        lines.append(f"timestamp ties     {stats['tied_interactions']:,} interactions share the previous one's time "
                     f"(kept in file order); targets decided by that order: test "
                     f"{stats['users_with_tied_test_target']:,} users, validation "
                     f"{stats['users_with_tied_validation_target']:,}")
    if "items_without_text" in stats:
        lines.append(f"items w/o text     {stats['items_without_text']:,}")
    for key, value in stats.get("reader", {}).items():
        lines.append(f"reader: {key.replace('_', ' ')} {value:,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="m2rec stats", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, metavar="YAML",
                        help="a config file (repeat to override, as with m2rec fit)")
    args = parser.parse_args(argv)
    datamodule = load_datamodule(args.config)
    stats = datamodule.stats
    out = datamodule.processed_dir / "stats.json"
    write_json(out, stats)
    print(format_stats(stats))
    print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
