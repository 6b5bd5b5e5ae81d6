"""`m2rec`: a LightningCLI (fit / validate / test / predict) plus `m2rec stats` (dataset statistics) and `m2rec serve`
(an HTTP server, m2rec_lightning/serve.py).

Errors of the user's making (a bad data file, a failed download, an unusable template, text model or `--ckpt_path`,
options that contradict each other) print as `error: ...` and exit with status 1; `--traceback` (anywhere on the
command line) or M2REC_TRACEBACK=1 shows the whole trace instead.

`m2rec`, `m2rec -h` and `m2rec --help` print an overview of the subcommands before anything heavy is imported: the
Lightning CLI itself is only defined (`M2RecCLI`, on first use) when a subcommand runs.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

MONITOR = "val/NDCG@10"
EVALUATING = ("validate", "test", "predict")
CKPT_CHOICES = "--ckpt_path best|last|FILE|URL"
CKPT_HELP = (
    "Checkpoint to load: `best` or `last` (of the `m2rec fit` run with the same run folder / checkpoint / logger "
    "settings, fitted on the same dataset; found in a fresh process too), a file, or an http(s) URL (downloaded afresh "
    "every time). Every checkpoint is loaded with weights_only=True. validate/test/predict refuse to run without one "
    "unless --untrained is given."
)
RUN_DIR = "${run_dir}"
"""Stands for the run folder in an output path of a config (e.g. a logger's `save_dir: ${run_dir}`)."""
RUN_DIR_HELP = (
    "One folder for everything a run writes: trainer.default_root_dir, the logger (a CSVLogger in RUN_DIR/logs unless "
    "trainer.logger names one), checkpoint.dirpath (RUN_DIR/checkpoints) and predict_writer.output_path "
    "(RUN_DIR/predictions.csv); each of these given explicitly wins, and `${run_dir}` in one stands for this folder. "
    "`auto`: runs/<dataset>-<encoder>, e.g. runs/Beauty-m2rec. Unset: Lightning's defaults (./lightning_logs)."
)
SUBCOMMANDS = {
    "fit": "train a model; checkpoints and logs go to the run folder (--run_dir)",
    "validate": f"evaluate a checkpoint ({CKPT_CHOICES}) on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "write each user's top-K items (raw ids, with scores) to a CSV or Parquet file",
    "stats": "prepare a dataset and print its statistics (takes the --config and --data... options of fit)",
    "serve": "answer top-K requests over HTTP from a checkpoint, with a live state per user (m2rec serve --help)",
    "embed-text": "embed the item texts of a config's dataset as a predict job, across devices, resumable",
}
OVERVIEW = "\n".join([
    "usage: m2rec SUBCOMMAND [--config FILE ...] [--OPTION VALUE ...]",
    "",
    "M2Rec sequential recommendation: train, evaluate and apply a model, and inspect a dataset.",
    "",
    "subcommands (`m2rec SUBCOMMAND --help` lists every option of one):",
    *(f"  {name:<12}{text}" for name, text in SUBCOMMANDS.items()),
    "",
    "options every subcommand takes:",
    "  -c, --config FILE   a YAML config; repeat it to layer configs (later ones override earlier ones)",
    "  --traceback         show the full trace of an error (also M2REC_TRACEBACK=1); errors are one line otherwise",
    "",
    "example:",
    "  m2rec fit --config configs/beauty.yaml --config configs/shared/beauty.yaml",
    "  m2rec test --config configs/beauty.yaml --config configs/shared/beauty.yaml --ckpt_path best",
])


class ConfigError(ValueError):
    """Options that contradict each other; the message names them."""


def _full_errors() -> bool:
    """Whether errors are shown whole (--traceback on the command line, or M2REC_TRACEBACK=1)."""
    return "--traceback" in sys.argv[1:] or os.environ.get("M2REC_TRACEBACK", "") not in ("", "0")


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that are the user's to fix, printed as one line (imported here: they pull in numpy/pandas)."""
    from datamodules.base import DataOptionError
    from datamodules.download import DownloadError
    from datamodules.parsing import DataFormatError, MissingFileError
    from datamodules.preprocess import EmptyDataError
    from datamodules.text_embeddings import TextModelError
    from datamodules.text_templates import TemplateError

    from .checkpoint import CheckpointError
    from .predictions import OutputPathError

    return (DataFormatError, DataOptionError, DownloadError, MissingFileError, EmptyDataError, TemplateError,
            TextModelError, CheckpointError, ConfigError, OutputPathError)


_UNION_NOISE = re.compile(r"Does not validate against any of the Union subtypes Subtypes: \[.*?\] Errors: ")


def one_line_parse_error(message: str) -> str:
    """jsonargparse's error for a command line or config that does not parse (often a dozen indented lines about
    union types) as one line: the option's full key and what is wrong with its value.

    E.g. `--data.max_len: Expected a <class 'int'>. Got value: x`. Anything not in that shape is kept whole, on one
    line."""
    text = " ".join(message.split())
    given = re.search(r" ?Given value type: .*? Given value: (.*)$", text)
    if given:
        text = text[: given.start()]
    text = _UNION_NOISE.sub("", text).replace("- Expected a <class 'NoneType'>", "")
    keys: list[str] = []
    for key in re.findall(r'Parser key "([^"]+)"', text):
        if key not in keys:
            keys.append(key)
    if not keys:
        return text
    problem = text.rsplit('Parser key "', 1)[1].split('": ', 1)[-1]
    problem = re.sub(r"^.*?Problem with given class_path (\S+): ", r"class_path \1: ", problem)
    problem = re.sub(r"\. Got value: Namespace\(.*$", "", problem).strip(" -")
    value = given.group(1) if given else ""
    if value and "Got value" not in problem and not value.startswith(("NestedArg(", "Namespace(")):
        problem += f" (got {value})"
    return f"--{'.'.join(keys)}: {problem}"


def user_error_in(err: BaseException, errors: tuple[type[Exception], ...]) -> BaseException | None:
    """`err` if it is a user error, else the first user error it was raised from (jsonargparse re-raises the error
    of a datamodule's constructor as a ValueError about union types, `from` the original), else None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, errors):
            return current
        seen.add(id(current))
        current = current.__cause__  # not __context__: an error raised while handling another may be a bug
    return None


# ------------------------------------------------------------------------------------------------ config rules
# Applied to the parsed config of a subcommand, before anything is instantiated.


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _spec(config: Namespace, key: str) -> Namespace | None:
    """The {class_path, init_args} spec at `key` of the config, or None when the value is not one."""
    value = config.get(key)
    return value if value is not None and hasattr(value, "get") and value.get("class_path") else None


def link_max_len(config: Namespace) -> None:
    """Give the encoder the datamodule's max_len: the data's option is the only one a user needs to set.

    A hard jsonargparse link (`parser.link_arguments`) would refuse every config that also names the encoder's
    max_len (configs and recorded runs do), so the rule here is softer: an encoder max_len left at its class default
    follows data.max_len; an explicit one must be at least data.max_len (a longer one only leaves positions unused,
    as ML-1M's 200 does under a shorter data override). A shorter one used to fail only in the sanity check, after
    the data were prepared (or never, when every sequence was short); now it fails before anything runs, naming
    both options."""
    encoder, data = _spec(config, "model.init_args.encoder"), _spec(config, "data")
    if encoder is None or data is None or encoder.get("init_args") is None:
        return
    data_len, encoder_len = data.init_args.get("max_len"), encoder.init_args.get("max_len")
    if data_len is None or encoder_len is None or data_len == encoder_len:
        return
    try:
        default = inspect.signature(_import(encoder.class_path)).parameters["max_len"].default
    except (ImportError, AttributeError, KeyError, ValueError, TypeError):
        default = inspect.Parameter.empty
    if encoder_len == default:
        encoder.init_args.max_len = data_len
    elif encoder_len < data_len:
        raise ConfigError(
            f"--model.init_args.encoder.init_args.max_len {encoder_len} is shorter than --data.init_args.max_len "
            f"{data_len}, so inputs would not fit the encoder: leave the encoder's out (it follows data.max_len) or "
            "make it at least as long"
        )


def encoder_reads_text(encoder: Namespace) -> bool | None:
    """Whether the encoder of this spec reads item text when there is some (None: it cannot be told).

    Told by building it once for one item with one-dimensional text: exact for every encoder (SASRec never reads
    text, M2Rec unless `semantic: false`), and cheap."""
    init_args = encoder.get("init_args")
    try:
        probe = _import(encoder.class_path)(1, 1, **(init_args.as_dict() if init_args is not None else {}))
    except Exception:  # noqa: BLE001 - the real construction reports any problem with the options
        return None
    return bool(getattr(probe, "uses_text", True))


def drop_unread_text(config: Namespace) -> str | None:
    """Switch data.text off when the encoder reads no item text, so no text table is embedded for nothing (a
    language model pass over every item). Returns a note saying so, or None."""
    encoder, data = _spec(config, "model.init_args.encoder"), _spec(config, "data")
    if encoder is None or data is None or data.get("init_args") is None or data.init_args.get("text") is None:
        return None
    if encoder_reads_text(encoder) is not False:
        return None
    data.init_args.text = None
    return f"data.text is ignored: {encoder.class_path.rpartition('.')[2]} reads no item text (no text table is built)"


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("._") or "run"


def auto_run_dir(config: Namespace) -> Path:
    """runs/<dataset>-<encoder>: the datamodule's name (built once, unprepared, for its `name`) and the encoder's
    class name less `Encoder` (the model's class name when it has no encoder spec)."""
    from datamodules.stats import datamodule_from_config

    dataset = datamodule_from_config(config.data.as_dict()).name
    encoder = _spec(config, "model.init_args.encoder") or _spec(config, "model")
    model = encoder.class_path.rpartition(".")[2].removesuffix("Encoder").lower() if encoder else "model"
    return Path("runs") / _safe_name(f"{dataset}-{model}")


def _output_paths(config: Namespace) -> list[tuple[Namespace, str]]:
    """(namespace, key) of every output path of a subcommand's config: the trainer's root, each logger's save_dir,
    the checkpoint folder and the predictions file."""
    places = [(config.trainer, "default_root_dir")]
    loggers = config.trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if logger is not None and hasattr(logger, "get") and logger.get("init_args") is not None:
            places.append((logger.init_args, "save_dir"))
    places += [(config[key], field) for key, field in (("checkpoint", "dirpath"), ("predict_writer", "output_path"))
               if config.get(key) is not None]
    return places


def apply_run_dir(config: Namespace, run_dir: Path | None) -> None:
    """Put every output path not given explicitly under `run_dir`, and replace `${run_dir}` in the others (see
    RUN_DIR_HELP). Without a run folder only the `${run_dir}` check applies."""
    from jsonargparse import Namespace

    from .predictions import TopKWriter

    for place, key in _output_paths(config):
        value = place.get(key)
        if isinstance(value, str) and RUN_DIR in value:
            if run_dir is None:
                raise ConfigError(f"an output path is {value!r} but there is no run folder: set --run_dir DIR or auto")
            place[key] = value.replace(RUN_DIR, str(run_dir))
    if run_dir is None:
        return
    trainer = config.trainer
    if trainer.get("default_root_dir") is None:
        trainer.default_root_dir = str(run_dir)
    if trainer.get("logger") in (None, True):  # Lightning's default logger: make it a CSVLogger in the run folder
        trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                   init_args=Namespace(save_dir=str(run_dir), name="logs"))
    if config.get("checkpoint") is not None and config.checkpoint.get("dirpath") is None:
        config.checkpoint.dirpath = str(run_dir / "checkpoints")
    default_output = inspect.signature(TopKWriter).parameters["output_path"].default
    if config.get("predict_writer") is not None and config.predict_writer.get("output_path") == default_output:
        config.predict_writer.output_path = str(run_dir / default_output)


# ------------------------------------------------------------------------------------------------ the Lightning CLI


@functools.cache
def cli_class() -> type[LightningCLI]:
    """`M2RecCLI`, defined on first use: its base class imports Lightning (seconds), which the overview never needs."""
    import torch
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities import rank_zero_info

    from .checkpoint import (
        CheckpointError,
        EpochTimer,
        ModelCheckpoint,
        check_readable,
        dataset_identity,
        download_checkpoint,
        is_url,
        stored_dataset,
    )
    from .predictions import TopKWriter

    class M2RecArgumentParser(LightningArgumentParser):
        """LightningCLI's parser, whose errors are one line (`error: --key: what is wrong`) instead of a 100-line
        usage text and a dozen lines about union types; M2REC_TRACEBACK=1 (or --traceback) shows them whole, and
        JSONARGPARSE_DEBUG keeps jsonargparse's own behaviour (raise instead of exit)."""

        def error(self, message: str, ex: Exception | None = None) -> Any:
            if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG") or _full_errors():
                return super().error(message, ex)
            sys.stderr.write(f"error: {one_line_parse_error(message)}\n")
            sys.stderr.write("(m2rec SUBCOMMAND --help lists the options; --traceback shows the whole message)\n")
            raise SystemExit(2)

    class M2RecCLI(LightningCLI):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parser_class", M2RecArgumentParser)
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            from lightning.pytorch.callbacks import EarlyStopping

            parser.link_arguments("data.num_items", "model.init_args.num_items", apply_on="instantiate")
            parser.link_arguments("data.text_dim", "model.init_args.text_dim", apply_on="instantiate")
            parser.add_argument("--run_dir", type=Optional[str], default=None, help=RUN_DIR_HELP)
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": MONITOR,
                    "checkpoint.mode": "max",
                    "checkpoint.save_last": True,
                    "checkpoint.filename": "epoch{epoch:03d}-ndcg10_{val/NDCG@10:.4f}",
                    "checkpoint.auto_insert_metric_name": False,
                }
            )
            parser.add_lightning_class_args(EarlyStopping, "early_stopping")
            parser.set_defaults({"early_stopping.monitor": MONITOR, "early_stopping.mode": "max",
                                 "early_stopping.patience": 10})
            parser.add_lightning_class_args(TopKWriter, "predict_writer")
            parser.add_lightning_class_args(EpochTimer, "epoch_timer")

        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            for action in parser._actions:
                if action.dest == "ckpt_path":
                    action.help = CKPT_HELP
                elif action.dest == "weights_only":
                    action.help = "Leave unset: every checkpoint is loaded with weights_only=True, and false is refused."
            if subcommand in EVALUATING:
                parser.add_argument(
                    "--untrained", action="store_true",
                    help=f"{subcommand} the model as initialised, without a checkpoint (a baseline, on purpose); "
                         f"without it {subcommand} needs {CKPT_CHOICES}",
                )
            return parser

        def _parse_ckpt_path(self) -> None:
            """Keep the model the config describes when `--ckpt_path` names a file.

            LightningCLI would re-parse the model from the checkpoint's hyper-parameters, which leave out the encoder
            (a module factory, not a hyper-parameter), so every encoder option would silently fall back to its default
            (ML-1M's max_len 200 became 50 and the weights no longer fit). The command line's config is the source."""

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            link_max_len(config)
            if note := drop_unread_text(config):
                rank_zero_info(note)
            run_dir = config.get("run_dir")
            apply_run_dir(config, (auto_run_dir(config) if run_dir == "auto" else Path(run_dir)) if run_dir else None)

        def _run_subcommand(self, subcommand: str) -> None:
            # URL checkpoints are downloaded here and deleted when the subcommand ends
            with tempfile.TemporaryDirectory(prefix="m2rec-ckpt-") as downloads:
                self._downloads = Path(downloads)
                try:
                    super()._run_subcommand(subcommand)
                except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused the file
                    detail = next((line for line in str(err).splitlines() if "Unsupported" in line), "")
                    detail = detail.split(" Please use")[0].strip()  # torch goes on to say how to allow the global
                    raise CheckpointError(
                        f"--ckpt_path {self.config[subcommand].get('ckpt_path')}: refused to load: the file holds "
                        "pickled objects other than tensors and plain values, which could run code "
                        f"({detail or 'see --traceback'})"
                    ) from err

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if kwargs.get("weights_only") is False:
                raise CheckpointError("--weights_only false is refused: m2rec checkpoints hold only tensors and plain "
                                      "values, and unpickling anything else can run code")
            # torch>=2.6 defaults to weights_only=True for files, but Lightning passes False for remote paths
            kwargs["weights_only"] = True
            shown = kwargs.get("ckpt_path")
            kwargs["ckpt_path"] = self._checkpoint_file(subcommand, shown)
            if kwargs["ckpt_path"] is not None and Path(kwargs["ckpt_path"]).is_file():
                check_readable(kwargs["ckpt_path"], str(shown))
            return kwargs

        def _checkpoint_file(self, subcommand: str, ckpt_path: str | Path | None) -> str | None:
            """The checkpoint file the trainer loads, or None to run without one (fit from scratch, or --untrained)."""
            if subcommand in EVALUATING:
                untrained = bool(self.config[subcommand].get("untrained"))
                if untrained and ckpt_path is not None:
                    raise CheckpointError(f"m2rec {subcommand}: --untrained and --ckpt_path {ckpt_path} exclude each "
                                          "other")
                if untrained:
                    return None
                if ckpt_path is None:
                    raise CheckpointError(f"m2rec {subcommand}: no checkpoint given, so the model would be untrained; "
                                          f"pass {CKPT_CHOICES}, or --untrained to run it untrained on purpose")
            if ckpt_path is None:
                return None
            ckpt = str(ckpt_path)
            if is_url(ckpt):
                path = download_checkpoint(ckpt, self._downloads)
                print(f"downloaded {ckpt} ({path.stat().st_size:,} bytes)")
                return str(path)
            if subcommand in EVALUATING and ckpt in ("best", "last"):
                return self._resolve_named(ckpt)
            if subcommand == "fit" and ckpt == "last":
                # resume this dataset's run only; with no last.ckpt yet Lightning starts afresh (and says so)
                found = self._newest_last(ckpt, required=False)
                return ckpt if found is None else str(found[0])
            if Path(ckpt).is_file():
                # absolute, because Lightning takes any path that starts with "http" (e.g. "http_runs/a.ckpt") for a URL
                return str(Path(ckpt).resolve())
            if ckpt in ("best", "last", "hpc") or ckpt.startswith("registry") or "://" in ckpt:
                return ckpt  # Lightning's own or an fsspec URL (s3://, ...)
            raise CheckpointError(f"--ckpt_path {ckpt}: no such file (nor best, last or an http(s) URL)")

        def _checkpoint_folders(self) -> tuple[list[Path], str]:
            """Where `m2rec fit` with this config wrote its checkpoints (Lightning's rule: checkpoint.dirpath, else
            <logger save_dir>/<name>/<version>/checkpoints, else <default_root_dir>/checkpoints), and that place in
            words. An unversioned logger starts a new version in every process, so every version folder is a
            candidate."""
            callback = self.trainer.checkpoint_callback
            if callback is not None and callback.dirpath is not None:
                return [Path(callback.dirpath)], str(callback.dirpath)
            if self.trainer.loggers:
                logger = self.trainer.loggers[0]
                root = Path(logger.save_dir or self.trainer.default_root_dir) / str(logger.name)
                version = getattr(logger, "_version", None)
                if version is not None:
                    folder = root / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"
                    return [folder], str(folder)
                return sorted(root.glob("*/checkpoints")), str(root / "*" / "checkpoints")
            folder = Path(self.trainer.default_root_dir) / "checkpoints"
            return [folder], str(folder)

        def _newest_last(self, which: str, required: bool = True) -> tuple[Path, dict] | None:
            """The newest last*.ckpt of the fit's checkpoint folder(s) that was fitted on this dataset (or records no
            dataset: written before datasets were recorded), with its contents; None when there is no last.ckpt and
            it is not `required`. Another dataset's run is refused: its weights may even fit (same item count)."""
            folders, where = self._checkpoint_folders()
            lasts = sorted((p for folder in folders for p in folder.glob("last*.ckpt")),
                           key=lambda p: p.stat().st_mtime, reverse=True)
            if not lasts:
                if not required:
                    return None
                raise CheckpointError(
                    f"--ckpt_path {which}: no last.ckpt in {Path(where).absolute()}; run `m2rec fit` with the same "
                    "run folder / checkpoint / logger settings first, or pass a checkpoint FILE"
                )
            current = dataset_identity(self.datamodule)
            others = []
            for last in lasts:
                # mmap: only what is read of a large checkpoint is loaded
                state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
                stored = stored_dataset(state)
                if current is None or stored is None or stored.get("cache_key") == current["cache_key"]:
                    return last, state
                others.append(stored)
            other = others[0]
            raise CheckpointError(
                f"--ckpt_path {which}: the runs in {Path(where).absolute()} were fitted on dataset {other.get('name')} "
                f"(cache key {other.get('cache_key')}), not {current['name']} (cache key {current['cache_key']}); give "
                "this dataset's --run_dir (or checkpoint.dirpath), or a checkpoint FILE"
            )

        def _resolve_named(self, which: str) -> str:
            """`--ckpt_path best|last` in a fresh process: the newest last*.ckpt of this dataset's run, or the best
            path that it recorded."""
            callback = self.trainer.checkpoint_callback
            if which == "best" and callback is not None and callback.best_model_path:
                return callback.best_model_path  # fitted in this process
            last, state = self._newest_last(which)
            if which == "last":
                print(f"last checkpoint: {last}")
                return str(last)
            best = next(
                (v["best_model_path"] for k, v in state.get("callbacks", {}).items()
                 if k.startswith("ModelCheckpoint")),
                "",
            )
            # a relative path is relative to where fit ran; the file sits beside last.ckpt either way
            found = next((p for p in (Path(best), last.parent / Path(best).name) if best and p.is_file()), None)
            if found is None:
                raise CheckpointError(f"--ckpt_path best: {last} records no existing best checkpoint (got {best!r})")
            print(f"best checkpoint: {found}")
            return str(found)

    M2RecCLI.__module__ = M2RecArgumentParser.__module__ = __name__
    M2RecArgumentParser.__qualname__ = "M2RecArgumentParser"
    M2RecCLI.__qualname__ = "M2RecCLI"
    return M2RecCLI


def __getattr__(name: str) -> Any:
    # `from m2rec_lightning.cli import M2RecCLI` (and USER_ERRORS) keep working; both are built on first use
    if name == "M2RecCLI":
        return cli_class()
    if name == "USER_ERRORS":
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The `m2rec` CLI; `run=False` only parses and instantiates (for scripts that drive the trainer themselves)."""
    from datamodules.base import SequentialDataModule

    from .module import SequentialRecommender

    return cli_class()(
        SequentialRecommender,
        SequentialDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"epilog": "`m2rec stats` prints dataset statistics (`m2rec --help` lists every subcommand). "
                                 "Errors in the data, the text template or model, the options or --ckpt_path print "
                                 "one line (error: ...) and exit with status 1; --traceback or M2REC_TRACEBACK=1 "
                                 "shows the full trace."},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Run `m2rec` with `args` (default: the command line). A user error prints `error: ...` and raises
    SystemExit(1), unless `--traceback` is among the arguments or M2REC_TRACEBACK=1 is set. No arguments, `-h` or
    `--help` print the overview of the subcommands (exit status 2, 0, 0)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        raise SystemExit(0 if argv else 2)
    traceback = "--traceback" in argv or os.environ.get("M2REC_TRACEBACK", "") not in ("", "0")
    if "--traceback" in argv:
        argv = [a for a in argv if a != "--traceback"]
        if args is None:
            # DDP ranks re-run sys.argv; they get the setting through the environment and a command line the
            # argument parser accepts
            sys.argv[1:] = argv
            os.environ["M2REC_TRACEBACK"] = "1"
    errors = user_errors()
    try:
        if argv[:1] == ["stats"]:
            from datamodules.stats import main as stats_main

            stats_main(argv[1:])
        elif argv[:1] == ["embed-text"]:
            from datamodules.embed_text import main as embed_main

            embed_main(argv[1:])
        elif argv[:1] == ["serve"]:
            from .serve import main as serve_main

            serve_main(argv[1:])
        else:
            make_cli(None if args is None else argv)
    except Exception as err:  # noqa: BLE001 - only user errors are reported; everything else goes on up
        found = user_error_in(err, errors)
        if found is None or traceback:
            raise
        print(f"error: {found}", file=sys.stderr)
        print("(run with --traceback or M2REC_TRACEBACK=1 for the full trace)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
