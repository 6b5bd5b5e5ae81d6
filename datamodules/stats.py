"""``m2rec stats --config cfg.yaml [--config override.yaml ...] [--data.OPTION VALUE ...]``: prepare a dataset and
report its statistics.

Reads only the ``data:`` section of the same YAML files ``m2rec fit`` takes, and takes the same ``--data...`` options
(``--data.path``, ``--data.init_args.min_user_interactions``, ``--data datamodules.SequenceFile``, ...); later
arguments override earlier ones, as in LightningCLI. Prints the counts and what every filter removed, and saves them
as ``stats.json`` beside the processed data (the folder ``m2rec fit`` reads: both key the cache alike).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from .base import SequentialDataModule
from .cache import write_json
from .parsing import DataFormatError, MissingFileError

CONFIG_FLAGS = ("--config", "-c")


class StatsUsageError(ValueError):
    """A command line that `m2rec stats` cannot parse; the message is one line naming the option."""


def data_section(path: str | Path) -> dict | None:
    """The ``data:`` section of a YAML config (None when it has none); a missing or malformed file is a one-line
    error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{path} not found (a --config file)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataFormatError(path, f"cannot read the config ({err})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DataFormatError(path, f"not valid YAML: {problem}", None if line is None else line + 1) from None
    if config is None:
        return None
    if not isinstance(config, dict):
        raise DataFormatError(path, f"a config must be a YAML mapping, got {type(config).__name__}")
    section = config.get("data")
    if section is not None and not isinstance(section, (dict, str)):
        raise DataFormatError(path, f"'data:' must be a mapping (class_path, init_args), got {type(section).__name__}")
    return section


def data_arguments(argv: Sequence[str]) -> list[str]:
    """`argv` with every ``--config FILE`` replaced by ``--data <its data: section as JSON>``, in place, so that
    configs and ``--data...`` options override each other in the order given (as in LightningCLI)."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, _, inline = arg.partition("=")
        if flag in CONFIG_FLAGS:
            if inline:
                path = inline
            elif i + 1 < len(args):
                path, i = args[i + 1], i + 1
            else:
                raise StatsUsageError(f"{flag} needs a YAML file")
            section = data_section(path)
            if section is not None:
                out += ["--data", json.dumps(section)]
        else:
            out.append(arg)
        i += 1
    return out


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="m2rec stats", exit_on_error=False,
        description="Prepare a dataset and print its statistics (saved as stats.json beside the processed data). Takes "
                    "the configs and the --data... options of m2rec fit; later ones override earlier ones.",
    )
    parser.add_argument("-c", "--config", action="append", metavar="YAML",
                        help="a config file; only its data: section is read (repeat to override, as with m2rec fit)")
    parser.add_subclass_arguments(SequentialDataModule, "data", required=True)
    return parser


def parse_datamodule(argv: Sequence[str]) -> SequentialDataModule:
    """Instantiate the datamodule that ``m2rec stats ARGV`` describes (configs' data sections and --data options).

    jsonargparse merges them in order exactly as LightningCLI does (a later class_path replaces the class but keeps
    the init_args the new class also accepts) and type-checks every argument."""
    args = data_arguments(argv)
    if not any(a == "--data" or a.startswith("--data.") or a.startswith("--data=") for a in args):
        raise StatsUsageError("no dataset given: pass --config FILE with a 'data:' section, or --data CLASS and its "
                              "--data.OPTION values")
    parser = _parser()
    try:
        config = parser.parse_args(args)
    except ArgumentError as err:
        from m2rec_lightning.cli import one_line_parse_error  # the CLI's rule, so both subcommands read alike

        raise StatsUsageError(one_line_parse_error(str(err))) from None
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    return instantiate(config).data


def datamodule_from_config(section: dict) -> SequentialDataModule:
    """The datamodule of one parsed ``data:`` section ({class_path, init_args}), not yet prepared."""
    parser = _parser()
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    return instantiate(parser.parse_object({"data": section})).data


def load_datamodule(config_paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> SequentialDataModule:
    """The datamodule of the ``data:`` sections of the given YAML files, then the ``--data...`` `overrides`."""
    argv = [a for path in config_paths for a in ("--config", str(path))]
    return parse_datamodule(argv + list(overrides))


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


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or "-h" in args or "--help" in args:
        _parser().print_help()
        raise SystemExit(0 if args else 2)
    try:
        datamodule = parse_datamodule(args)
    except StatsUsageError as err:
        print(f"error: m2rec stats: {err}", file=sys.stderr)
        print("(m2rec stats --help lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    stats = datamodule.stats
    out = datamodule.processed_dir / "stats.json"
    write_json(out, stats)
    print(format_stats(stats))
    print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
