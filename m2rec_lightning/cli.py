"""`m2rec`: a LightningCLI (fit / validate / test / predict) plus `m2rec stats` for dataset statistics.

Errors of the user's making (a bad data file, a failed download, an unusable template or `--ckpt_path`) print as
`error: ...` and exit with status 1; `--traceback` (anywhere on the command line) or M2REC_TRACEBACK=1 shows the
whole trace instead.
"""
from __future__ import annotations

import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.base import SequentialDataModule
from datamodules.download import DownloadError
from datamodules.parsing import DataFormatError, MissingFileError
from datamodules.preprocess import EmptyDataError
from datamodules.text_templates import TemplateError

from .checkpoint import CheckpointError, ModelCheckpoint, download_checkpoint, is_url
from .module import SequentialRecommender
from .predictions import TopKWriter

MONITOR = "val/NDCG@10"
EVALUATING = ("validate", "test", "predict")
CKPT_CHOICES = "--ckpt_path best|last|FILE|URL"
CKPT_HELP = (
    "Checkpoint to load: `best` or `last` (of the `m2rec fit` run with the same checkpoint folder / logger settings; "
    "found in a fresh process too), a file, or an http(s) URL (downloaded afresh every time). Every checkpoint is "
    "loaded with weights_only=True. validate/test/predict refuse to run without one unless --untrained is given."
)
USER_ERRORS = (DataFormatError, DownloadError, MissingFileError, EmptyDataError, TemplateError, CheckpointError)


class M2RecCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_items", "model.init_args.num_items", apply_on="instantiate")
        parser.link_arguments("data.text_dim", "model.init_args.text_dim", apply_on="instantiate")
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
        parser.set_defaults({"early_stopping.monitor": MONITOR, "early_stopping.mode": "max", "early_stopping.patience": 10})
        parser.add_lightning_class_args(TopKWriter, "predict_writer")

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

        LightningCLI would re-parse the model from the checkpoint's hyper-parameters, which leave out the encoder (a
        module factory, not a hyper-parameter), so every encoder option would silently fall back to its default
        (ML-1M's max_len 200 became 50 and the weights no longer fit). The command line's config is the source."""

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
                    f"--ckpt_path {self.config[subcommand].get('ckpt_path')}: refused to load: the file holds pickled "
                    f"objects other than tensors and plain values, which could run code ({detail or 'see --traceback'})"
                ) from err

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("weights_only") is False:
            raise CheckpointError("--weights_only false is refused: m2rec checkpoints hold only tensors and plain "
                                  "values, and unpickling anything else can run code")
        # torch>=2.6 defaults to weights_only=True for files, but Lightning passes False for remote paths
        kwargs["weights_only"] = True
        kwargs["ckpt_path"] = self._checkpoint_file(subcommand, kwargs.get("ckpt_path"))
        return kwargs

    def _checkpoint_file(self, subcommand: str, ckpt_path: str | Path | None) -> str | None:
        """The checkpoint file the trainer loads, or None to run without one (fit from scratch, or --untrained)."""
        if subcommand in EVALUATING:
            untrained = bool(self.config[subcommand].get("untrained"))
            if untrained and ckpt_path is not None:
                raise CheckpointError(f"m2rec {subcommand}: --untrained and --ckpt_path {ckpt_path} exclude each other")
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
        if Path(ckpt).is_file():
            # absolute, because Lightning takes any path that starts with "http" (e.g. "http_runs/a.ckpt") for a URL
            return str(Path(ckpt).resolve())
        if ckpt in ("best", "last", "hpc") or ckpt.startswith("registry") or "://" in ckpt:
            return ckpt  # Lightning's own (fit resumes from `last` when there is one) or an fsspec URL (s3://, ...)
        raise CheckpointError(f"--ckpt_path {ckpt}: no such file (nor best, last or an http(s) URL)")

    def _checkpoint_folders(self) -> tuple[list[Path], str]:
        """Where `m2rec fit` with this config wrote its checkpoints (Lightning's rule: checkpoint.dirpath, else
        <logger save_dir>/<name>/<version>/checkpoints, else <default_root_dir>/checkpoints), and that place in
        words. An unversioned logger starts a new version in every process, so every version folder is a candidate."""
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

    def _resolve_named(self, which: str) -> str:
        """`--ckpt_path best|last` in a fresh process: the newest last*.ckpt of the fit's checkpoint folder(s), or the
        best path that it recorded."""
        callback = self.trainer.checkpoint_callback
        if which == "best" and callback is not None and callback.best_model_path:
            return callback.best_model_path  # fitted in this process
        folders, where = self._checkpoint_folders()
        lasts = [p for folder in folders for p in folder.glob("last*.ckpt")]
        if not lasts:
            raise CheckpointError(
                f"--ckpt_path {which}: no last.ckpt in {Path(where).absolute()}; run `m2rec fit` with the same "
                "checkpoint/logger settings first, or pass a checkpoint FILE"
            )
        last = max(lasts, key=lambda p: p.stat().st_mtime)
        if which == "last":
            print(f"last checkpoint: {last}")
            return str(last)
        state = torch.load(last, map_location="cpu", weights_only=True)
        best = next(
            (v["best_model_path"] for k, v in state.get("callbacks", {}).items() if k.startswith("ModelCheckpoint")),
            "",
        )
        # a relative path is relative to where fit ran; the file sits beside last.ckpt either way
        found = next((p for p in (Path(best), last.parent / Path(best).name) if best and p.is_file()), None)
        if found is None:
            raise CheckpointError(f"--ckpt_path best: {last} records no existing best checkpoint (got {best!r})")
        print(f"best checkpoint: {found}")
        return str(found)


def make_cli(args: list[str] | None = None, run: bool = True) -> M2RecCLI:
    """The `m2rec` CLI; `run=False` only parses and instantiates (for scripts that drive the trainer themselves)."""
    return M2RecCLI(
        SequentialRecommender,
        SequentialDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"epilog": "`m2rec stats` prints dataset statistics. Errors in the data, the text template or "
                                 "--ckpt_path print one line (error: ...) and exit with status 1; --traceback or "
                                 "M2REC_TRACEBACK=1 shows the full trace."},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Run `m2rec` with `args` (default: the command line). A user error prints `error: ...` and raises
    SystemExit(1), unless `--traceback` is among the arguments or M2REC_TRACEBACK=1 is set."""
    argv = list(sys.argv[1:] if args is None else args)
    traceback = "--traceback" in argv or os.environ.get("M2REC_TRACEBACK", "") not in ("", "0")
    if "--traceback" in argv:
        argv = [a for a in argv if a != "--traceback"]
        if args is None:
            # DDP ranks re-run sys.argv; they get the setting through the environment and a command line the
            # argument parser accepts
            sys.argv[1:] = argv
            os.environ["M2REC_TRACEBACK"] = "1"
    try:
        if argv[:1] == ["stats"]:
            from datamodules.stats import main as stats_main

            stats_main(argv[1:])
        else:
            make_cli(None if args is None else argv)
    except USER_ERRORS as err:
        if traceback:
            raise
        print(f"error: {err}", file=sys.stderr)
        print("(run with --traceback or M2REC_TRACEBACK=1 for the full trace)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
