"""Quality rows on one lent GPU: every (model, seed) of a quality table fitted at once, one process each, under one
wall-clock budget. Made for a short lease on a bare, offline H100/H200 (benchmarks/gpu_check.py is its speed twin).

    python -m experiments.gpu_quality --prepare                      # here: data caches + text-encoder record
    python -m experiments.gpu_quality --out $OUT/quality_ml-1m_gpu   # there (--budget-s bounds the whole run)
    python -m experiments.gpu_quality --models m2rec --grid encoder.hidden_size=64,256 --grid lr=1e-3,2e-3 \
        --out $OUT/search_ml-1m_m2rec_gpu                            # there: a validation-only search, then its winner

What travels (2026-11 lease, 21 MB): `data/` and `gpu_carry/` from --prepare; the wheels of jsonargparse,
docstring_parser and typeshed_client (the GPU image lacks them; install with pip --target and put it on PYTHONPATH);
and the data through a git-ignored link `shared -> ../shared` in the checkout, carried as `shared/data/ml-1m` and
linked back there with `ln -s "$PWD/shared" ../shared`. The exact command is in experiments/results/ml-1m/quality_ml-1m_gpu.md.

Each child is `experiments/quality_table.py` (fit with early stopping on validation NDCG@10, test of the best
checkpoint), all writing one OUT.json under its file lock; the child's trainer.max_time is what is left of the budget.
With --grid, each child is instead one point and seed of a `experiments/search.py` search (validation only, into
OUT.json); when all have ended, the setting with the best mean validation NDCG@10 is tested once per seed, on the
checkpoints that never leave the machine, into OUT_test.json (quality_table.py --from-search).
Before the fits, the Triton scan is checked against the PyTorch scan on the GPU (gpu_check.triton_check); the Mamba
models use it only if every check passes, else the PyTorch scan.

Why `--prepare`: the packaged all-MiniLM-L6-v2 weights (87 MB) exceed what travels to the GPU machine (64 MiB), so
the item-text table is computed here, travels in the data cache (`data/`), and the run there names the encoder by
the identity recorded here (gpu_carry/text_model.json). Its cache key is then the one computed here: a hit loads the
very table the CPU runs used; a miss fails loudly (the recorded source folder does not exist there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from experiments import quality_table, search

TEXT_RECORD = ROOT / "gpu_carry" / "text_model.json"


def uses_mamba(model: str) -> bool:
    """Whether the model's config builds the Mamba encoder (M2RecEncoder), i.e. takes a mamba_backend."""
    path = ROOT / "configs" / "models" / f"{model}.yaml"
    if not path.is_file():  # popularity: no network at all
        return False
    return yaml.safe_load(path.read_text())["model"]["init_args"]["encoder"]["class_path"].endswith(".M2RecEncoder")


def prepare(dataset: str) -> None:
    """Build the data and item-text caches of `dataset` here and record the text encoder's identity."""
    os.chdir(ROOT)
    cli = quality_table.build_cli(quality_table.dataset_configs(dataset) + [ROOT / "configs/models/m2rec.yaml"],
                                  ["--trainer.accelerator=cpu"])
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    record = record_text_model(TEXT_RECORD)
    print(f"prepared {dataset}; text encoder recorded in {TEXT_RECORD.relative_to(ROOT)}: {record['revision']}")


def record_text_model(path: Path) -> dict:
    """Write the default text encoder's identity (as resolved here) to `path`; its source is marked as not there."""
    from datamodules import text_embeddings

    resolved = text_embeddings.resolve_model(text_embeddings.DEFAULT_MODEL)
    record = dataclasses.asdict(resolved) | {"source": f"<{resolved.source} on the machine that ran --prepare>"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


CHILD_SCRIPTS = {"quality_table": quality_table.main, "search": search.main}


def run_child(argv: list[str]) -> None:
    """`argv` = [SCRIPT, *its arguments]: one quality_table.py or search.py run with the text encoder named by the
    record (see the module docstring)."""
    from datamodules import text_embeddings

    recorded = text_embeddings.ResolvedModel(**json.loads(TEXT_RECORD.read_text()))

    def resolve_model(model: str = text_embeddings.DEFAULT_MODEL, revision: str | None = None):
        if model != text_embeddings.DEFAULT_MODEL or revision is not None:
            raise ValueError(f"gpu_quality.py carries only the default text encoder's table, not {model}@{revision}")
        return recorded

    text_embeddings.resolve_model = resolve_model
    script, *rest = argv
    CHILD_SCRIPTS[script](rest)


def metrics_progress(work_dir: Path, dataset: str, run_name: str, seed: int) -> str:
    """'epochs N, val NDCG@10 last/best' from the CSV log of the child's run folder (a model or a search point)."""
    logs = sorted((work_dir / dataset / run_name / f"seed{seed}").glob("**/metrics.csv"))
    if not logs:
        return "starting"
    rows = [line.split(",") for line in logs[-1].read_text().splitlines()]
    if not rows:
        return "starting"
    col = rows[0].index("val/NDCG@10") if "val/NDCG@10" in rows[0] else None
    vals = [float(r[col]) for r in rows[1:] if col is not None and col < len(r) and r[col]]
    return f"epochs {len(vals)}, val NDCG@10 {vals[-1]:.4f} / best {max(vals):.4f}" if vals else "epoch 1"


def fits(args: argparse.Namespace, configs_of) -> dict[tuple[str, int], list[str]]:
    """(run folder name, seed) -> the child's arguments: one quality_table.py run per model and seed, or with --grid
    one search.py run per point and seed; `configs_of(model)` lists the extra configs of a model's runs (whose
    experiments/configs/ files name the folder too, as in quality_table.run_folder)."""
    common = ["--dataset", args.dataset, "--max-epochs", "200", "--patience", str(args.patience),
              "--accelerator", args.accelerator, "--work-dir", str(args.work_dir), "--out", str(args.out)]
    if not args.grid:
        return {(quality_table.run_folder(model, configs_of(model)), seed):
                ["quality_table", *common, "--models", model, "--seeds", str(seed),
                 *[a for c in configs_of(model) for a in ("--extra-config", str(c))]]
                for model in args.models for seed in args.seeds}
    (model,) = args.models
    return {(quality_table.run_folder(search.point_name(model, point), configs_of(model)), seed):
            ["search", *common, "--model", model, "--seeds", str(seed),
             *[a for key, value in point.items() for a in ("--grid", f"{key}={value}")],
             *[a for c in configs_of(model) for a in ("--extra-config", str(c))]]
            for point in search.parse_grid(args.grid) for seed in args.seeds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="build caches and the text-encoder record here, then stop")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--dataset", choices=quality_table.DATASETS, default="ml-1m")
    p.add_argument("--models", nargs="+", choices=quality_table.MODELS, default=list(quality_table.HEADLINE))
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="search.py's grid axis, repeatable: fit every point of the one --models model on validation "
                        "only, then test the winner")
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu",
                   help="cpu runs the whole plan without a GPU (a dry run)")
    p.add_argument("--extra-config", type=Path, action="append", default=None,
                   help="configs applied after the model's, repeatable (default: ml-1m_batch16_lr2e-3.yaml)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall time of this whole command")
    p.add_argument("--reserve-s", type=float, default=75.0,
                   help="budget kept for each child's start-up, test and write-up after its fit's max_time "
                        "(with --grid: and for the winner's test)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/m2rec_gpu_quality"))
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "ml-1m" / "quality_ml-1m_gpu")
    args = p.parse_args(argv)
    if args.child is not None:
        return run_child(args.child)
    if args.prepare:
        return prepare(args.dataset)
    start = time.monotonic()
    args.extra_config = args.extra_config or [HERE / "configs" / "ml-1m_batch16_lr2e-3.yaml"]
    if not TEXT_RECORD.is_file():
        p.error(f"{TEXT_RECORD} is missing: run --prepare on a machine with the text encoder and carry gpu_carry/")
    if args.grid and len(args.models) != 1:
        p.error(f"--grid searches one model, not {args.models}")
    try:
        search.parse_grid(args.grid)
    except ValueError as e:
        p.error(str(e))

    import torch
    from gpu_check import triton_check

    backend = "torch"
    if args.accelerator == "gpu":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
        rows = triton_check("cuda", small=False)
        for row in rows:
            print(" | ".join(row), flush=True)
        backend = "triton" if all(r[-1] == "ok" for r in rows) else "torch"
    print(f"Mamba backend for the fits: {backend}", flush=True)
    backend_config = args.work_dir / f"backend_{backend}.yaml"
    backend_config.parent.mkdir(parents=True, exist_ok=True)
    backend_config.write_text(f"model:\n  init_args:\n    encoder:\n      init_args:\n        mamba_backend: {backend}\n")
    fit_s = int(args.budget_s - (time.monotonic() - start) - args.reserve_s)
    if fit_s < 60:
        p.error(f"only {fit_s} s left for the fits; raise --budget-s")
    max_time = args.work_dir / "max_time.yaml"
    max_time.write_text(f"trainer:\n  max_time: '00:00:{fit_s // 60:02d}:{fit_s % 60:02d}'\n")
    plan = fits(args, lambda model: [*args.extra_config, max_time] + ([backend_config] if uses_mamba(model) else []))
    print(f"{len(plan)} fits at once, trainer.max_time {fit_s} s each", flush=True)

    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    children = {}
    for (run_name, seed), child_args in plan.items():
        with open(args.work_dir / f"{run_name}-{seed}.log", "w") as log:  # the child keeps its own handle
            children[(run_name, seed)] = subprocess.Popen([sys.executable, __file__, "--child", *child_args],
                                                          stdout=log, stderr=subprocess.STDOUT, env=env)
    while any(proc.poll() is None for proc in children.values()):
        time.sleep(20)
        elapsed = time.monotonic() - start
        print(f"-- {elapsed:.0f} s", flush=True)
        for (run_name, seed), proc in children.items():
            state = "running" if proc.returncode is None else f"exit {proc.returncode}"
            print(f"   {run_name} seed {seed}: {state}; {metrics_progress(args.work_dir, args.dataset, run_name, seed)}",
                  flush=True)
        if elapsed > args.budget_s:
            for proc in children.values():
                proc.kill()
    failed = [(key, proc.returncode) for key, proc in children.items() if proc.returncode != 0]
    for (run_name, seed), code in failed:
        tail = (args.work_dir / f"{run_name}-{seed}.log").read_text(errors="replace").splitlines()[-15:]
        print(f"== {run_name} seed {seed} failed (exit {code}):\n" + "\n".join(tail), flush=True)
    if args.grid and len(failed) < len(children):
        # the winner among the points that finished; --min-seeds: a point that lost a seed cannot win on fewer
        test = subprocess.run([sys.executable, __file__, "--child", "quality_table", "--dataset", args.dataset,
                               "--accelerator", args.accelerator, "--from-search", str(args.out.with_suffix(".json")),
                               "--min-seeds", str(len(args.seeds)), "--out", f"{args.out}_test"], env=env)
        failed += [("winner test", test.returncode)] if test.returncode else []
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
