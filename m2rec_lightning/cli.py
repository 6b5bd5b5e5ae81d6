"""`m2rec`: a LightningCLI (fit / validate / test / predict) plus `m2rec stats` for dataset statistics."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.base import SequentialDataModule

from .checkpoint import ModelCheckpoint
from .module import SequentialRecommender
from .predictions import TopKWriter

MONITOR = "val/NDCG@10"


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

    def _parse_ckpt_path(self) -> None:
        """Keep the model the config describes when `--ckpt_path` names a file.

        LightningCLI would re-parse the model from the checkpoint's hyper-parameters, which leave out the encoder (a
        module factory, not a hyper-parameter), so every encoder option would silently fall back to its default
        (ML-1M's max_len 200 became 50 and the weights no longer fit). The command line's config is the source."""

    def _resolve_best(self) -> None:
        """Make `--ckpt_path best` work in a fresh process: read the best path that `last.ckpt` recorded."""
        subcommand = self.config.get("subcommand")
        if self.config[subcommand].get("ckpt_path") != "best":
            return
        callback = self.trainer.checkpoint_callback
        if callback is None or callback.best_model_path:
            return
        last = Path(callback.dirpath or "") / "last.ckpt"
        if callback.dirpath is None or not last.exists():
            raise FileNotFoundError(
                f"--ckpt_path best: no checkpoint folder with last.ckpt found (checkpoint.dirpath={callback.dirpath}); "
                "run `m2rec fit` with the same config first, or pass a checkpoint file"
            )
        state = torch.load(last, map_location="cpu", weights_only=True)
        best = next(
            (v["best_model_path"] for k, v in state.get("callbacks", {}).items() if k.startswith("ModelCheckpoint")),
            "",
        )
        if not best or not Path(best).exists():
            raise FileNotFoundError(f"--ckpt_path best: {last} records no existing best checkpoint (got {best!r})")
        callback.best_model_path = best
        print(f"best checkpoint: {best}")

    def before_validate(self) -> None:
        self._resolve_best()

    def before_test(self) -> None:
        self._resolve_best()

    def before_predict(self) -> None:
        self._resolve_best()


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
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["stats"]:
        from datamodules.stats import main as stats_main

        stats_main(argv[1:])
        return
    make_cli(args)


if __name__ == "__main__":
    main()
