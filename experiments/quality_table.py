"""Quality table: train each model through the `m2rec` CLI, test its validation-selected checkpoint, and
write a Markdown table, a JSON record and a PNG of validation NDCG@10 per epoch.

Every run builds the same `M2RecCLI` that `m2rec fit` builds, from the dataset configs (configs/<dataset>.yaml +
the offline override configs/shared/<dataset>.yaml) plus one override per model (configs/models/<model>.yaml), then
calls `trainer.fit` and `trainer.test(ckpt_path="best")`. So the table measures the product, not a re-implementation.
"popularity" is the floor: items ranked by their count in the TRAINING interactions (each user's sequence without its
validation and test items), scored with the same pessimistic-tie full ranking as the models.

Results are merged into OUT.json after every run (a file lock makes concurrent invocations safe), and OUT.md / OUT.png
are rewritten from all runs recorded there, so a long job can be split over several invocations:

    python -m experiments.quality_table --dataset beauty --models popularity sasrec mamba4rec m2rec \
        --seeds 42 43 44 --max-epochs 200 --patience 10 --out experiments/results/beauty/quality_beauty
    python -m experiments.quality_table --dataset beauty --models m2rec_no_fourier --seeds 42 ...

A hyper-parameter search (experiments/search.py) fits its points on validation only; `--from-search SEARCH.json`
then tests the checkpoints of the point with the best mean validation NDCG@10, once, and records them as rows labelled
with their setting (e.g. `m2rec [encoder.dropout=0.5]`) beside the rows that use the published settings.

Run it from anywhere; config paths resolve against the repository root.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import yaml
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Callback, Timer, WeightAveraging

from datamodules.base import SequentialDataModule
from experiments.upgrade import upgrade_config
from m2rec_lightning.cli import MONITOR, M2RecCLI, make_cli
from m2rec_lightning.metrics import RankingMetrics, mask_scores, pessimistic_rank

ROOT = Path(__file__).resolve().parents[1]
TRAINING_CONFIGS = ROOT / "experiments" / "configs"

MODELS = ("popularity", "sasrec", "sasrec_recbole", "mamba4rec", "mamba4rec_residual", "m2rec", "m2rec_no_multiscale",
          "m2rec_no_fourier", "m2rec_no_semantic", "m2rec_sum_gate", "m2rec_no_residual")
HEADLINE = ("m2rec", "sasrec", "mamba4rec")
DATASETS = ("beauty", "ml-1m")
KS = (5, 10, 20)
METRICS = tuple(f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in KS)
# Published numbers to read our rows against (HR@10, NDCG@10, MRR@10; None = not reported).
ANCHORS = {
    "beauty": [
        ("SASRec, public RecBole runs", 0.083, 0.0416, None),
        ("RecBLR (paper)", 0.0881, 0.0446, None),
    ],
    "ml-1m": [
        ("M2Rec (paper)", 0.3224, 0.1867, 0.1455),
        ("Mamba4Rec (paper)", 0.3121, 0.1822, 0.1425),
        ("RecBLR (paper)", 0.3285, 0.1901, None),
    ],
}
SASREC_TARGET = {"beauty": {"HR@10": 0.083, "NDCG@10": 0.0416}}


class EpochHistory(Callback):
    """Records every validation epoch's metrics and the fit's wall time and process CPU time at its end (sanity checks
    excluded). CPU time counts every thread of this process, so on a shared machine it leaves out the waits for a
    core that wall time includes (not the time of DataLoader worker processes). Its state rides in the checkpoints,
    so a fit resumed from one (`--resume`) keeps the epochs, seconds and hardware before it; `seconds` counts fit time
    up to the last checkpoint of each earlier process, not the epoch a kill cut short."""

    def __init__(self, hardware: str) -> None:
        self.epochs: list[dict] = []
        self.segments = [{"after_epochs": 0, "hardware": hardware}]  # one per process that fitted part of the run
        self.earlier_seconds = self.earlier_cpu_seconds = 0.0
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.start

    def cpu_seconds(self) -> float:
        return self.earlier_cpu_seconds + time.process_time() - self.cpu_start

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.epochs.append({"epoch": trainer.current_epoch, "seconds": round(self.seconds(), 2),
                            "cpu_seconds": round(self.cpu_seconds(), 2), "val": metrics})

    def state_dict(self) -> dict:
        return {"epochs": self.epochs, "segments": self.segments, "seconds": self.seconds(),
                "cpu_seconds": self.cpu_seconds()}

    def load_state_dict(self, state: dict) -> None:
        hardware = self.segments[-1]["hardware"]
        self.epochs, self.earlier_seconds = state["epochs"], state["seconds"]
        self.earlier_cpu_seconds = state.get("cpu_seconds", 0.0)  # checkpoints before it was recorded lack it
        self.segments = [*state["segments"], {"after_epochs": len(self.epochs), "hardware": hardware}]


def dataset_configs(dataset: str) -> list[Path]:
    return [ROOT / "configs" / f"{dataset}.yaml", ROOT / "configs" / "shared" / f"{dataset}.yaml"]


def build_cli(configs: list[Path], overrides: list[str]) -> M2RecCLI:
    """The CLI exactly as `m2rec` builds it (m2rec_lightning.cli.main), without running a subcommand."""
    args = [a for c in configs for a in ("--config", str(c))] + overrides
    return make_cli(args, run=False)


def hardware(accelerator: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def source_commit() -> str | None:
    """The checked-out commit, with "+changes" when tracked code differs from it (results files aside: runs write
    them while others run); None outside a git checkout (the GPU machine gets the working tree without .git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!experiments/results")
        return commit + ("+changes" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def short_commit(commit: str | None) -> str:
    return "—" if commit is None else commit[:10] + ("+changes" if commit.endswith("+changes") else "")


def check_resumable(last: Path, run_dir: Path) -> None:
    """A fit resumes only from a checkpoint that carries its EpochHistory: the record needs every epoch since the
    start, and Lightning would silently resume without it."""
    callbacks = torch.load(last, map_location="cpu", weights_only=False).get("callbacks", {})
    if EpochHistory.__qualname__ not in callbacks:
        raise RuntimeError(f"--resume: {last} holds no epoch history (saved by an older benchmark?), so the record "
                           f"would miss the epochs before it; delete {run_dir} to fit from the start")


class RunFolderBusy(RuntimeError):
    """Another process is fitting into the run folder."""


def lock_path(path: Path) -> Path:
    """A lock file for `path`, outside it (the lock must outlive deleting the folder) and outside the results."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"quality_table-{digest}.lock"


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold `run_dir` for one fit: a second process given the same model, setting and seed would otherwise delete or
    resume the folder under the first one's feet."""
    lock = FileLock(str(lock_path(run_dir)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderBusy(f"{run_dir} is being fitted by another process (lock {lock.lock_file}); give each "
                            "process its own seeds or settings") from None
    try:
        yield
    finally:
        lock.release()


def run_model(model: str, seed: int, args: argparse.Namespace, extra_overrides: list[str] = [],
              run_name: str | None = None, test: bool = True) -> dict:
    """Fit one model with one seed through the CLI; test the checkpoint with the best validation NDCG@10.

    `extra_overrides` are CLI arguments applied last (a hyper-parameter setting); `run_name` names the run folder
    (default: the model); `test=False` stops after the fit, so a search never sees test metrics. Raises RunFolderBusy
    when another process is fitting into the same run folder."""
    run_dir = args.work_dir / args.dataset / run_folder(run_name or model, args.extra_config) / f"seed{seed}"
    with exclusive(run_dir):
        return fit_and_test(model, seed, args, run_dir, extra_overrides, test)


def fit_and_test(model: str, seed: int, args: argparse.Namespace, run_dir: Path, extra_overrides: list[str],
                 test: bool) -> dict:
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = args.resume and last.is_file()
    if resume:
        check_resumable(last, run_dir)
    elif run_dir.exists():  # a stale best checkpoint from an earlier run must not be picked up
        shutil.rmtree(run_dir)
    configs = dataset_configs(args.dataset) + [ROOT / "configs" / "models" / f"{model}.yaml"] + args.extra_config
    overrides = [
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.max_epochs={args.max_epochs}",
        f"--trainer.accelerator={args.accelerator}",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        f"--checkpoint.dirpath={run_dir / 'checkpoints'}",
        f"--early_stopping.patience={args.patience}",
        f"--predict_writer.output_path={run_dir / 'predictions.csv'}",
        *extra_overrides,
    ]
    load_before = os.getloadavg()[0]
    commit = source_commit()  # before the fit: the code may be committed further while it runs
    cli = build_cli(configs, overrides)
    history = EpochHistory(hardware(args.accelerator))
    cli.trainer.callbacks.append(history)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=last if resume else None)
    fit_seconds = history.earlier_seconds + time.perf_counter() - start
    # before testing: trainer.test restores the callbacks' state (this history's too) from the best checkpoint, saved
    # before any stop
    fitted = history.state_dict()
    ended = ended_by(cli.trainer, len(fitted["epochs"]))
    best_path = cli.trainer.checkpoint_callback.best_model_path
    if not best_path:
        raise RuntimeError(f"{model} seed {seed}: fit saved no best checkpoint (no validation epoch completed?)")
    best_epoch = int(torch.load(best_path, map_location="cpu", weights_only=False)["epoch"])
    tested, test_seconds = None, None
    if test:
        # The best checkpoint's state_dict holds the averaged weights that validation chose; restoring it in this
        # process, Lightning's own WeightAveraging callbacks (EMA, SWA; not m2rec_lightning.EMAWeightAveraging) would
        # load its live weights over them (a fresh `m2rec test` has no averaged model and keeps the state_dict).
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, WeightAveraging)]
        start = time.perf_counter()
        (logged,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
        test_seconds = round(time.perf_counter() - start, 1)
        tested = {k.removeprefix("test/"): float(v) for k, v in logged.items() if k.startswith("test/")}
    val_best = next(e["val"] for e in fitted["epochs"] if e["epoch"] == best_epoch)
    return {
        "model": model,
        "seed": seed,
        "test": tested,
        "val_at_best": val_best,
        "best_epoch": best_epoch,
        "best_checkpoint": os.path.relpath(best_path, ROOT),
        "epochs_run": len(fitted["epochs"]),
        "ended_by": ended,
        "fit_seconds": round(fit_seconds, 1),
        "test_seconds": test_seconds,
        "history": fitted["epochs"],
        **({"fit_segments": fitted["segments"]} if len(fitted["segments"]) > 1 else {}),
        "parameters": sum(p.numel() for p in cli.model.parameters() if p.requires_grad),
        "budget": {"max_epochs": args.max_epochs, "patience": args.patience, "monitor": MONITOR},
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "hardware": hardware(args.accelerator),
        "commit": commit,
        "config_files": [os.path.relpath(c, ROOT) for c in configs],
        "overrides": overrides,
        "config": cli.parser.dump(cli.config, skip_none=False),
    }


def fit_hardware(run: dict) -> list[str]:
    """The hardware of every process that fitted `run` (more than one when it was resumed)."""
    return [segment["hardware"] for segment in run.get("fit_segments", [])] or [run["hardware"]]


def epochs_cell(run: dict) -> str:
    """Epochs run, and where a resumed fit picked up: "20 (resumed after 9)"."""
    resumed = [str(segment["after_epochs"]) for segment in run.get("fit_segments", [])[1:]]
    return f"{run['epochs_run']}" + (f" (resumed after {', '.join(resumed)})" if resumed else "")


def ended_by(trainer, epochs_run: int) -> str:
    """What ended a fit: "early stopping", "max_epochs", "max_time" (trainer.max_time) or "interrupted"."""
    early = trainer.early_stopping_callback
    if early is not None and early.stopped_epoch > 0:
        return "early stopping"
    if epochs_run >= trainer.max_epochs:  # the trainer's: a grid point or an extra config may override --max-epochs
        return "max_epochs"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return "max_time" if timer is not None and timer.time_remaining() <= 0 else "interrupted"


def search_winner_clis(search_json: Path, args: argparse.Namespace, cli_options: list[str]):
    """For each seed of the setting that ranks first on validation in a search record (among the settings fitted with
    at least `args.min_seeds` seeds; only the seeds in `args.search_seeds` when given): its point, its best checkpoint
    (checked to be there and from the recorded epoch) and the CLI built from the point's saved config plus
    `cli_options`."""
    search = json.loads(search_json.read_text())
    if search["dataset"] != args.dataset:
        raise ValueError(f"{search_json} is a search on {search['dataset']}, not {args.dataset}")
    if not search["points"]:
        raise ValueError(f"{search_json} records no finished point")
    setting, points = search_winner(search["points"], args.min_seeds, search_json, args.search_seeds)
    for point in points:
        if "best_checkpoint" not in point:
            raise ValueError(f"{search_json}: the point {setting} seed {point['seed']} records no best_checkpoint")
        checkpoint = ROOT / point["best_checkpoint"]
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{search_json}: checkpoint {checkpoint} of {setting} seed {point['seed']} is gone "
                                    "(experiments/search.py --refit-missing with the same grid refits it)")
        epoch = int(torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"])
        if epoch != point["best_epoch"]:
            raise ValueError(f"{checkpoint} is from epoch {epoch}, but the search recorded its best at "
                             f"{point['best_epoch']}: the run folder was reused after the search")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
            config.write(yaml.safe_dump(upgrade_config(yaml.safe_load(point["config"]))))
            config.flush()
            cli = build_cli([Path(config.name)], cli_options)
        yield point, checkpoint, cli


def test_search_winner(search_json: Path, args: argparse.Namespace, overrides: list[str] = []) -> list[dict]:
    """Test, once, each seed's best checkpoint of a search record's validation winner (`search_winner_clis`); the rows
    carry the setting and the search's fit record (history, config, timings). `overrides` are CLI options applied to
    the test only (an evaluation option such as exclude_seen)."""
    rows = []
    options = [f"--trainer.accelerator={args.accelerator}", "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", *overrides]
    for point, checkpoint, cli in search_winner_clis(search_json, args, options):
        start = time.perf_counter()
        (logged,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoint), verbose=False)
        rows.append({**point, "search": os.path.relpath(search_json, ROOT),
                     "test": {k.removeprefix("test/"): float(v) for k, v in logged.items() if k.startswith("test/")},
                     "test_seconds": round(time.perf_counter() - start, 1)})
    return rows


def popularity_counts(dm: SequentialDataModule) -> torch.Tensor:
    """(N+1,) float64 count of each item in the training interactions: every user's sequence minus its last two items
    (the validation and test targets). Index 0 (padding) is 0."""
    counts = torch.zeros(dm.num_items + 1, dtype=torch.float64)
    for user in range(dm.num_users):
        train = torch.as_tensor(dm.sequence(user)[:-2], dtype=torch.long)
        counts.index_add_(0, train, torch.ones(len(train), dtype=torch.float64))
    return counts


def evaluate_scores(scores: torch.Tensor, loader, ks=KS) -> dict[str, float]:
    """Metrics of one fixed (N+1,) score vector for every user of `loader`, ranked as the models are."""
    metrics = RankingMetrics(ks)
    for batch in loader:
        target = batch["target"]
        batch_scores = mask_scores(scores.expand(len(target), -1).float(), target)  # (B, N+1)
        metrics.update(pessimistic_rank(batch_scores, target))
    return {k: float(v) for k, v in metrics.compute().items()}


def run_popularity(args: argparse.Namespace) -> dict:
    """The most-popular floor on the same datamodule the models get (the dataset configs, no model override)."""
    configs = dataset_configs(args.dataset) + args.extra_config
    # the CLI also builds a model, unused here: without the text branch, so a text-less data config is accepted
    cli = build_cli(configs, [f"--trainer.accelerator={args.accelerator}", "--trainer.logger=false",
                              "--model.init_args.encoder.init_args.semantic=false"])
    dm = cli.datamodule
    dm.setup("test")
    start = time.perf_counter()
    counts = popularity_counts(dm)
    result = {
        "model": "popularity",
        "seed": None,
        "test": evaluate_scores(counts, dm.test_dataloader()),
        "val_at_best": evaluate_scores(counts, dm.val_dataloader()),
        "best_epoch": None,
        "epochs_run": 0,
        "fit_seconds": round(time.perf_counter() - start, 1),
        "history": [],
        "hardware": hardware("cpu"),
        "config_files": [os.path.relpath(c, ROOT) for c in configs],
        "config": cli.parser.dump(cli.config, skip_none=False),
    }
    return result


# ---- recording ---------------------------------------------------------------------------------------------------

def training_configs(config_files: list) -> list[str]:
    """The names of the experiments/configs/ files among `config_files` (absolute, or relative to the repository root):
    those set training hyper-parameters, so runs that differ in them are different rows, searched points and run
    folders. Other extra configs (data files, max_time caps, backends) leave a run what it is."""
    # normpath, not resolve: this runs for every row of every rendered table, and the paths are already resolved
    return [Path(c).stem for c in config_files if Path(os.path.normpath(ROOT / c)).parent == TRAINING_CONFIGS]


def run_folder(name: str, config_files: list) -> str:
    """The run folder of a model or search point fitted with `config_files`: one per training config, so that a run
    with experiments/configs/ema.yaml never deletes the checkpoints of the same run without it."""
    return "+".join([name, *training_configs(config_files)])


def label(run: dict) -> str:
    """A row's name: the model, plus the searched setting and the experiments/configs/ files it was trained with."""
    setting = run.get("setting")
    return (run["model"] + (" [" + ", ".join(f"{k}={v}" for k, v in setting.items()) + "]" if setting else "")
            + "".join(f" + {c}" for c in training_configs(run["config_files"])))


def at_defaults(run: dict) -> bool:
    """Whether a run used its model's default settings: not a search winner, and no training-hyper-parameter file
    from experiments/configs/ among its configs (max_time files elsewhere only bound the wall time)."""
    return not run.get("setting") and not training_configs(run["config_files"])


def run_key(run: dict) -> tuple:
    return label(run), run["seed"]


def setting_key(setting: dict, config_files: list) -> tuple:
    """What makes search points the same setting: the searched values, whatever order their keys were given in, and
    the training configs they were fitted with (the same values with and without EMA are two settings)."""
    return tuple(sorted(setting.items())), tuple(training_configs(config_files))


def rank_settings(points: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Search points grouped by setting (`setting_key`), best mean validation NDCG@10 (over seeds) first."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault(setting_key(p["setting"], p["config_files"]), []).append(p)
    ranked = sorted(groups.values(), key=lambda g: -statistics.mean(p["val_at_best"]["NDCG@10"] for p in g))
    return [(g[0]["setting"], g) for g in ranked]


def search_winner(points: list[dict], min_seeds: int, source: Path,
                  seeds: list[int] | None = None) -> tuple[dict, list[dict]]:
    """The best-ranked setting among those with at least `min_seeds` seeds (a one-seed point that is lucky on
    validation must not beat a setting whose mean is over three), with its points of `seeds` only when given; the
    winner is chosen on all its seeds either way."""
    ranked = rank_settings(points)
    eligible = [(setting, group) for setting, group in ranked if len(group) >= min_seeds]
    if not eligible:
        raise ValueError(f"{source}: no setting has {min_seeds} or more seeds (most: "
                         f"{max(len(g) for _, g in ranked)}); lower --min-seeds or fit more seeds")
    setting, group = eligible[0]
    if seeds:
        missing = set(seeds) - {p["seed"] for p in group}
        if missing:
            raise ValueError(f"{source}: the winner {setting} was not fitted with seed(s) {sorted(missing)}")
        group = [p for p in group if p["seed"] in seeds]
    return setting, group


def record(out: Path, dataset: str, run: dict | None, notes: list[str] = []) -> dict:
    """Merge `run` and `notes` into OUT.json (a run replaces an earlier one of the same row and seed), rewrite
    OUT.md and OUT.png from everything recorded, and return all results. `run=None` only re-renders."""
    def merge(results: dict) -> None:
        if results["dataset"] != dataset:
            raise ValueError(f"{out}.json holds {results['dataset']} results; use another --out for {dataset}")
        results.setdefault("notes", []).extend(n for n in notes if n not in results["notes"])
        if run is not None:
            results["runs"] = [r for r in results["runs"] if run_key(r) != run_key(run)]
            results["runs"].append(run)
        results["runs"].sort(key=lambda r: (MODELS.index(r["model"]), label(r), r["seed"] or 0))

    def render(results: dict) -> None:
        out.with_suffix(".md").write_text(markdown(results))
        plot(results, out.with_suffix(".png"))

    return update_json(out.with_suffix(".json"), {"dataset": dataset, "notes": [], "runs": []}, merge, render)


def update_json(path: Path, empty: dict, update, render=None) -> dict:
    """Read the JSON record at `path` (or `empty`), let `update(record)` change it in place, write it back atomically,
    then let `render(record)` write the files shown from it, all under a file lock so that concurrent invocations never
    lose each other's results; returns the record. Rendering comes after the write, so it cannot lose the record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path(path))):
        record = json.loads(path.read_text()) if path.exists() else empty
        update(record)
        tmp = path.with_suffix(".json.tmp")
        # one field per line for readable diffs, without indentation: the long Beauty record's nested configs and
        # histories would otherwise pass 1 MiB
        tmp.write_text(json.dumps(record, indent=0))
        tmp.replace(path)
        if render is not None:
            render(record)
    return record


def mean_std(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(results: dict) -> str:
    dataset, runs = results["dataset"], results["runs"]
    trained = [r for r in runs if r["model"] != "popularity"]
    lines = [
        f"# Quality table: {dataset}",
        "",
        "Generated by `experiments/quality_table.py` (full data in the `.json` beside this file: every run's exact "
        "resolved config, per-epoch validation metrics, timings). Protocol: leave-one-out, full ranking over all items, "
        "pessimistic ties, no history masking; checkpoint selected on validation NDCG@10; test evaluated once on it.",
        "",
    ]
    budgets = sorted({(r["budget"]["max_epochs"], r["budget"]["patience"]) for r in trained})
    if budgets:
        lines += ["**Budget-limited runs.** " + "; ".join(f"max {e} epochs, early-stopping patience {p}"
                                                          for e, p in budgets)
                  + " (the released settings are 200 epochs, patience 10). "
                  + ("Rows named with a [setting] are the validation winners of a hyper-parameter search "
                     "(experiments/search.py, named in the Runs table below); every other row uses"
                     if any(r.get("setting") for r in trained) else "No row is a search winner: every model uses")
                  + " its published / RecBole default settings (configs/models/*.yaml), changed only by the extra "
                  "config files named in the Runs table (those under experiments/configs/ set training hyper-parameters; "
                  "max_time files only bound the wall time).", ""]
    lines += [f"- {note}" for note in results.get("notes", [])] + ([""] if results.get("notes") else [])
    hardware = sorted({h for r in runs for h in fit_hardware(r)})
    lines += ["Hardware: " + "; ".join(hardware) + ". Load averages at the start and end of each run are in the "
              "table below: on a shared machine they say how contended its wall time was.", ""]
    header = "| model | seeds | " + " | ".join(METRICS) + " | best epoch / epochs run | fit time (s) |"
    lines += ["## Test metrics (mean ± sample std over seeds)", "", header,
              "|" + "---|" * (header.count("|") - 1)]
    for name in dict.fromkeys(label(r) for r in runs):
        rows = [r for r in runs if label(r) == name]
        model = rows[0]["model"]
        seeds = ", ".join(str(r["seed"]) for r in rows) if rows[0]["seed"] is not None else "—"
        cells = [mean_std([r["test"][m] for r in rows]) for m in METRICS]
        if model == "popularity":
            extra = ["—", f"{rows[0]['fit_seconds']:.1f}"]
        else:
            extra = [", ".join(f"{r['best_epoch'] + 1}/{r['epochs_run']}" for r in rows),
                     mean_std([r["fit_seconds"] for r in rows], 0)]
        name = f"**{name}**" if model in HEADLINE else name
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " | " + " | ".join(extra) + " |")
    lines.append("")
    target = SASREC_TARGET.get(dataset)
    # RecBole's number is for its default settings, so search winners and runs with a training config are not
    # evidence either way
    sasrec_rows = {m: [r for r in runs if r["model"] == m and at_defaults(r)] for m in ("sasrec", "sasrec_recbole")}
    if target and any(sasrec_rows.values()):
        lines += ["## SASRec against RecBole's published SASRec", "",
                  "The issue asks for agreement within 5 %; only a converged run (best epoch well before the last) can "
                  "test that, so a miss by a run that was still improving says nothing about the data or evaluation. "
                  "Only runs at the default settings count (no search setting, no experiments/configs/ file).",
                  ""]
        for model, rows in sasrec_rows.items():
            if not rows:
                continue
            parts = []
            for metric, ref in target.items():
                ours = statistics.mean(r["test"][metric] for r in rows)
                parts.append(f"{metric} {ours:.4f} vs {ref} ({100 * (ours / ref - 1):+.1f} %)")
            lines.append(f"- {model}: " + ", ".join(parts))
        lines.append("")
    if ANCHORS.get(dataset):
        lines += ["## Published anchors (not run here)", "", "| source | HR@10 | NDCG@10 | MRR@10 |", "|---|---|---|---|"]
        for name, *values in ANCHORS[dataset]:
            lines.append(f"| {name} | " + " | ".join("—" if v is None else f"{v}" for v in values) + " |")
        lines.append("")
    lines += ["## Runs", "", "Epochs are counted from 1. A run whose best epoch is its last was still improving.", "",
              "| model | seed | best epoch | val NDCG@10 at best | test NDCG@10 | epochs | still improving | fit (s) | "
              "load avg (start, end) | commit | config |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        trained_run = r["best_epoch"] is not None
        lines.append(
            f"| {label(r)} | {r['seed'] if r['seed'] is not None else '—'} | "
            f"{r['best_epoch'] + 1 if trained_run else '—'} | {r['val_at_best']['NDCG@10']:.4f} | "
            f"{r['test']['NDCG@10']:.4f} | {epochs_cell(r)} | "
            f"{('yes' if r['best_epoch'] + 1 == r['epochs_run'] else 'no') if trained_run else '—'} | "
            f"{r['fit_seconds']} | "
            f"{', '.join(str(x) for x in r.get('load_average', [])) or '—'} | "
            # runs from before commits were recorded (session 18) have none
            f"{short_commit(r.get('commit'))} | "
            + " + ".join(f"`{c}`" for c in r["config_files"])
            + (f" + the setting; winner of `{r['search']}`" if r.get("search") else "") + " |"
        )
    lines.append("")
    return "\n".join(lines)


def line_styles(names: list[str]) -> dict[str, tuple[str, str, str]]:
    """(colour, line style, marker) for each row name of a plot, distinct for up to 31 names: the headline models keep
    their own colours, other rows take seven colours first as solid lines, then dashed, dotted and dash-dotted (past
    that they repeat; a line never vanishes)."""
    styles = {name: (colour, "-", "o") for name, colour in zip(HEADLINE, ("tab:red", "tab:blue", "tab:green"))}
    colours = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
    others = itertools.cycle((colour, linestyle, marker) for (linestyle, marker), colour
                             in itertools.product((("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")), colours))
    return {name: styles[name] if name in styles else next(others) for name in names}


def plot(results: dict, path: Path) -> None:
    """Validation NDCG@10 per epoch of the headline models and of the search winners (one line per seed, one colour
    per row name)."""
    runs = [r for r in results["runs"] if (r["model"] in HEADLINE or r.get("search")) and r["history"]]
    if not runs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = line_styles(list(dict.fromkeys(label(r) for r in runs)))
    labelled = set()
    for r in runs:
        epochs = [e["epoch"] + 1 for e in r["history"]]
        colour, linestyle, marker = styles[label(r)]
        ax.plot(epochs, [e["val"]["NDCG@10"] for e in r["history"]], color=colour, ls=linestyle, marker=marker,
                alpha=0.8, lw=1.2, ms=3, label=None if label(r) in labelled else label(r))
        labelled.add(label(r))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(f"{results['dataset']}: validation NDCG@10 per epoch (one line per seed)")
    ax.grid(alpha=0.3)
    # below the axes: search-winner names are long enough to cover the curves and run past the figure's edge
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), fontsize=7, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_run_arguments(parser: argparse.ArgumentParser, work_dir: Path) -> None:
    """The options of a training run (`run_model`), shared with search.py; `resolve_run_arguments` checks them."""
    parser.add_argument("--dataset", choices=DATASETS, default="beauty")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="seeds for every trained model / point")
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10, help="early stopping on validation NDCG@10")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--work-dir", type=Path, default=work_dir, help="checkpoints and logs, one folder per run")
    parser.add_argument("--note", action="append", default=[],
                        help="a line recorded in the JSON and shown in the table (budget, contention, ...); repeatable")
    parser.add_argument("--extra-config", type=Path, action="append", default=[],
                        help="YAML applied after the dataset and model configs (e.g. another data file); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue a fit that was cut off from the last.ckpt in its run folder (its epochs stay in "
                             "the record; a trainer.max_time cap counts the time before the cut too) instead of "
                             "deleting the folder and fitting from the start")


def resolve_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, default_out: Path) -> None:
    if args.max_epochs < 1 or args.patience < 1:
        parser.error("--max-epochs and --patience must be >= 1")
    args.out = (args.out or default_out).resolve()
    args.work_dir = args.work_dir.resolve()
    args.extra_config = [c.resolve() for c in args.extra_config]
    for c in args.extra_config:
        if not c.is_file():
            parser.error(f"--extra-config {c}: no such file")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, ROOT / "runs" / "quality")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None, help="default: all, or none with "
                        "--from-search")
    parser.add_argument("--from-search", type=Path, action="append", default=[], metavar="SEARCH.json",
                        help="test the validation winner of a experiments/search.py record (no training); repeatable")
    parser.add_argument("--min-seeds", type=int, default=1,
                        help="with --from-search: only settings fitted with at least this many seeds can win")
    parser.add_argument("--search-seeds", nargs="+", type=int, default=None,
                        help="with --from-search: test only these seeds of the winner (default: all it was fitted with)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output stem: writes OUT.md, OUT.json, OUT.png (default experiments/results/<dataset>/quality_<dataset>)")
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md and OUT.png from OUT.json")
    args = parser.parse_args(argv)
    resolve_run_arguments(parser, args, ROOT / "experiments" / "results" / args.dataset / f"quality_{args.dataset}")
    if args.models is None:
        args.models = [] if args.from_search else list(MODELS)
    args.from_search = [p.resolve() for p in args.from_search]
    if args.min_seeds < 1:
        parser.error("--min-seeds must be >= 1")
    if (args.min_seeds != 1 or args.search_seeds) and not args.from_search:
        parser.error("--min-seeds and --search-seeds choose among --from-search points; no --from-search was given")
    for p in args.from_search:
        if not p.is_file():
            parser.error(f"--from-search {p}: no such file")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # the dataset configs name their data files relative to the repository root (../shared/data/...)
    os.chdir(ROOT)
    results = record(args.out, args.dataset, None, args.note)
    if args.render:
        return results
    for search_json in args.from_search:
        for run in test_search_winner(search_json, args):
            results = record(args.out, args.dataset, run)
            print(f"== {label(run)} seed {run['seed']}: test NDCG@10 {run['test']['NDCG@10']:.4f} "
                  f"HR@10 {run['test']['HR@10']:.4f} (validation winner of {run['search']})", flush=True)
    for model in args.models:
        for seed in [None] if model == "popularity" else args.seeds:
            print(f"== {args.dataset} {model} seed {seed}", flush=True)
            run = run_popularity(args) if model == "popularity" else run_model(model, seed, args)
            results = record(args.out, args.dataset, run)
            print(f"== {model} seed {seed}: test NDCG@10 {run['test']['NDCG@10']:.4f} HR@10 {run['test']['HR@10']:.4f}"
                  f" (best epoch {run['best_epoch']}, {run['fit_seconds']} s)", flush=True)
    return results


if __name__ == "__main__":
    main()
