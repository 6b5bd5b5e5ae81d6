"""One prepared GPU check: builds the CUDA kernels in the background while it times the PyTorch path, then
checks the kernels against the PyTorch path and prints ONE Markdown table. Made for a bare, offline H100/H200 machine
with CUDA's nvcc and a CUDA PyTorch; finishes in under 10 minutes (`--budget-s`).

    python benchmarks/gpu_check.py | tee gpu_check.md         # on the GPU machine
    python benchmarks/gpu_check.py --dry-run                   # CPU, tiny sizes: every code path but the kernels

What it does, in order (the build runs alongside steps 2-4):
  1. background build (capped by `--build-cap-s`) of mamba_ssm and causal_conv1d from the sdists in `--wheels`
     into `--site` (pip --no-index --no-deps --no-build-isolation --target), with MAMBA_FORCE_BUILD=TRUE,
     CAUSAL_CONV1D_FORCE_BUILD=TRUE, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16. Both setup.py files hard-code nine
     -gencode targets (sm_75 ... sm_121) whatever TORCH_CUDA_ARCH_LIST says, which would multiply the build time;
     the extracted copies are patched to compile for `--cuda-archs` (default 90) only. mamba_ssm's package
     `__init__` imports Mamba2/Mamba3/the LM model (Triton kernels, transformers); the copy installed here keeps only
     its version line so `mamba_ssm.ops.selective_scan_interface` imports without them.
  2. throughput (benchmarks/throughput.py, Mamba on the PyTorch scan): train step and full-ranking inference of
     M2Rec, Mamba4Rec and SASRec at L in `--lengths`, same batch per L across models, plus peak memory.
  3. ML-1M epoch: the real training epoch (all positions, L=200, batch 256) of M2Rec through the datamodule's
     DataLoader, timed after a warm-up epoch.
  4. ML-1M full fit: Lightning fit of M2Rec with early stopping (patience 10, val NDCG@10) under `--fit-cap-s`.
  2b. the Triton scan (needs no build): selective_scan_triton against the PyTorch scan (output and every gradient,
     fp32) and the Mamba block with backend="triton" against backend="torch" (fp32, bf16 autocast); then the
     throughput of M2Rec and Mamba4Rec on it. Steps 3 and 4 use the Triton backend when these checks pass.
  5. kernels (in a subprocess with `--site` on the path, once the build is done): mamba_ssm's selective_scan_fn
     and our Mamba block with backend="cuda" against backend="torch", fp32 and bf16 autocast, outputs and
     gradients; then the M2Rec / Mamba4Rec train step at L=200 on the CUDA kernels.
The item-text table is random (the text model is not on the GPU machine); it costs what the real one costs.

Data: ML-1M is read from `--ml1m` (default ../shared/data/ml-1m/ml-1m.seq.txt, or shared/data/... inside the
checkout). ../shared does not travel to the GPU machine; without the file the epoch and fit run on a synthetic
ML-1M-shaped data set (6,040 users, 3,416 items, ~1.0M interactions, random items) and the table says so.

The build inputs (gitignored, `--wheels`), fetched on a machine with internet:
    pip download --no-deps --no-binary :all: -d benchmarks/gpu_wheels mamba_ssm==2.3.2.post1 causal_conv1d==1.7.0
    pip download --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        -d benchmarks/gpu_wheels einops ninja
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

if "--dry-run" in sys.argv[1:]:
    # the dry run interprets the Triton kernels on the CPU; the flag must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SDISTS = ("mamba_ssm-2.3.2.post1.tar.gz", "causal_conv1d-1.7.0.tar.gz")  # built in this order
ARCH_ANCHOR = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
ARCH_PATCH = (
    '    if os.environ.get("M2REC_CUDA_ARCHS"):  # patched in by m2rec benchmarks/gpu_check.py\n'
    '        cc_flag = [f for a in os.environ["M2REC_CUDA_ARCHS"].split(",")\n'
    '                   for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]\n'
)


# ---- 1. background build ----------------------------------------------------------------------------------------
def prepare_sources(wheels: Path, work: Path) -> list[Path]:
    """Extract the sdists into `work` and patch each setup.py to honour M2REC_CUDA_ARCHS; the source folders."""
    folders = []
    for name in SDISTS:
        archive = wheels / name
        if not archive.exists():
            raise FileNotFoundError(f"{archive} is missing; fetch it as the docstring of {__file__} says")
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        folder = work / name.removesuffix(".tar.gz")
        setup = folder / "setup.py"
        text = setup.read_text()
        if ARCH_ANCHOR not in text:
            raise RuntimeError(f"{setup}: anchor {ARCH_ANCHOR.strip()!r} not found; the arch patch needs updating")
        setup.write_text(text.replace(ARCH_ANCHOR, ARCH_PATCH + ARCH_ANCHOR, 1))
        folders.append(folder)
    return folders


def start_build(wheels: Path, site: Path, archs: str, log_path: Path) -> subprocess.Popen:
    """Start the pip builds in their own process group (so the cap can kill nvcc too); returns the process."""
    work = Path(tempfile.mkdtemp(prefix="m2rec_gpu_build_"))
    folders = prepare_sources(wheels, work)
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
           "--no-cache-dir", "--upgrade", "--target", str(site)]
    wheel_files = sorted(str(p) for p in wheels.glob("*.whl"))
    steps = ([pip + wheel_files] if wheel_files else []) + [pip + [str(f)] for f in folders]
    init = site / "mamba_ssm" / "__init__.py"
    script = " && ".join(" ".join(f"'{a}'" for a in step) for step in steps)
    script += f" && {sys.executable} -c \"import pathlib,re; p=pathlib.Path('{init}'); " \
              "p.write_text(re.search(r'__version__.*', p.read_text()).group(0) + chr(10))\""
    env = dict(os.environ, MAMBA_FORCE_BUILD="TRUE", CAUSAL_CONV1D_FORCE_BUILD="TRUE", TORCH_CUDA_ARCH_LIST="9.0",
               MAX_JOBS="16", M2REC_CUDA_ARCHS=archs)
    log = open(log_path, "w")
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def finish_build(proc: subprocess.Popen | None, deadline: float, log_path: Path) -> str:
    """Wait for the build until `deadline` (perf_counter), then kill it; 'ok' or why not."""
    if proc is None:
        return "skipped (--dry-run)"
    try:
        proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return f"not finished within the cap (log: {log_path})"
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return f"failed (exit {proc.returncode}): {' / '.join(tail)[:300]}"
    return "ok"


# ---- data ---------------------------------------------------------------------------------------------------------
def ml1m_file(arg: Path | None, tiny: bool) -> tuple[Path, str]:
    """The ML-1M sequence file and a label; a synthetic ML-1M-shaped file when the real one is absent."""
    candidates = [arg] if arg else [ROOT.parent / "shared/data/ml-1m/ml-1m.seq.txt",
                                    ROOT / "shared/data/ml-1m/ml-1m.seq.txt"]
    for path in candidates:
        if path and path.exists() and not tiny:
            return path, "ML-1M (real)"
    users, items, mean = (64, 40, 30) if tiny else (6040, 3416, 165.5)
    rng = np.random.default_rng(0)
    lengths = np.maximum(20, rng.lognormal(np.log(mean) - 0.5, 1.0, users).astype(int))
    path = Path(tempfile.mkdtemp(prefix="m2rec_synth_")) / "synthetic.seq.txt"
    with open(path, "w") as f:
        for u, n in enumerate(lengths, 1):
            f.write(f"{u} " + " ".join(map(str, rng.integers(1, items + 1, n))) + "\n")
    return path, f"synthetic ML-1M-shaped ({users} users, {items} items, {int(lengths.sum()):,} interactions)"


def ml1m_datamodule(path: Path, max_len: int, batch: int, eval_batch: int, data_dir: Path):
    from datamodules import SequenceFile

    return SequenceFile(path=str(path), data_dir=str(data_dir), max_len=max_len, batch_size=batch,
                        eval_batch_size=eval_batch, name="gpu_check_ml1m")


# ---- 3. epoch, 4. fit ----------------------------------------------------------------------------------------------
def epoch_time(dm, device: str, text_dim: int, backend: str, epochs: int = 2) -> tuple[float, int]:
    """Seconds of the last of `epochs` training epochs of M2Rec on dm (the first warms up), and its step count."""
    from throughput import build_model, synchronize

    model = build_model("m2rec", dm.max_len, dm.num_items, text_dim, device, mamba_backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loader = dm.train_dataloader()
    for _ in range(epochs):
        synchronize(device)
        start, steps = time.perf_counter(), 0
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            inputs = batch["input_ids"].to(device, non_blocking=True)
            targets = batch["target_ids"].to(device, non_blocking=True)
            model.loss(model.encoder(inputs), targets).backward()
            opt.step()
            steps += 1
        synchronize(device)
    return time.perf_counter() - start, steps


def full_fit(dm, device: str, text_dim: int, backend: str, cap_s: float, max_epochs: int) -> dict:
    """Lightning fit of M2Rec with early stopping on val NDCG@10 (patience 10) under a wall-time cap."""
    import datetime

    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping
    from throughput import build_model

    L.seed_everything(42)
    model = build_model("m2rec", dm.max_len, dm.num_items, text_dim, "cpu", mamba_backend=backend)
    model.setup = lambda stage: None  # the random text table is in place; the datamodule has none to hand over
    early = EarlyStopping("val/NDCG@10", mode="max", patience=10)
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_epochs=max_epochs,
                        max_time=datetime.timedelta(seconds=cap_s), callbacks=[early], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - start
    return dict(wall_s=wall, epochs=trainer.current_epoch, early_stopped=early.stopped_epoch > 0,
                best=float(early.best_score), capped=wall >= cap_s * 0.98)


# ---- 2b. Triton --------------------------------------------------------------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def scan_inputs(batch: int, dim: int, length: int, state: int, device: str) -> list[torch.Tensor]:
    """Random u, delta, A, B, C, D, z, delta_bias of a selective scan, seeded, in Mamba's ranges (softplus(delta) small,
    A negative)."""
    torch.manual_seed(0)
    return [torch.randn(batch, dim, length, device=device), torch.randn(batch, dim, length, device=device) - 2,
            -torch.rand(dim, state, device=device) - 0.5, torch.randn(batch, state, length, device=device),
            torch.randn(batch, state, length, device=device), torch.randn(dim, device=device),
            torch.randn(batch, dim, length, device=device), torch.randn(dim, device=device) * 0.1]


def triton_check(device: str, small: bool) -> list[tuple[str, str, str, str]]:
    """Rows: the Triton scan and the Mamba block on it against the PyTorch path (fp32; block also bf16 autocast)."""
    from m2rec_lightning.ops.mamba import Mamba
    from m2rec_lightning.ops.selective_scan import selective_scan
    from m2rec_lightning.ops.selective_scan_triton import selective_scan_triton

    batch, dim, length, state = (2, 8, 20, 4) if small else (16, 128, 200, 32)
    leaves = scan_inputs(batch, dim, length, state, device)
    g = torch.randn(batch, dim, length, device=device)
    results = []
    for scan in (selective_scan_triton, selective_scan):
        args = [t.clone().requires_grad_() for t in leaves]
        y = scan(*args, delta_softplus=True)
        results.append([y.detach(), *torch.autograd.grad(y, args, g)])
    errs = [rel(a, b) for a, b in zip(*results)]
    rows = [("Triton scan fp32 vs torch scan (y; grads u, delta, A, B, C, D, z, bias)",
             f"y {errs[0]:.1e}; grads max {max(errs[1:]):.1e}", "< 1e-4 / < 1e-3",
             "ok" if errs[0] < 1e-4 and max(errs[1:]) < 1e-3 else "FAIL")]
    d_model = 8 if small else 64
    torch.manual_seed(1)
    fast = Mamba(d_model, d_state=state, backend="triton").to(device)
    return rows + block_rows(fast, "triton", batch, length, device)


def block_rows(fast, label: str, batch: int, length: int, device: str, stand_in=None) -> list[tuple]:
    """The Mamba block `fast` against a backend="torch" copy with its weights, fp32 and bf16 autocast: rows of the
    relative errors of the output, the input gradient and in_proj's weight gradient. `stand_in` replaces the scan of
    `fast` (the dry run's stand-in for a kernel)."""
    import m2rec_lightning.ops.mamba as mamba_module

    slow = mamba_module.Mamba(fast.d_model, d_state=fast.d_state, backend="torch").to(device)
    slow.load_state_dict(fast.state_dict())
    rows = []
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        x = torch.randn(batch, length, fast.d_model, device=device, requires_grad=True)
        outs = []
        for block in (fast, slow):
            block.zero_grad()
            x.grad = None
            original = mamba_module.selective_scan
            if stand_in is not None and block is fast:
                mamba_module.selective_scan = stand_in
            try:
                with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    y = block(x)
                y.float().square().mean().backward()
            finally:
                mamba_module.selective_scan = original
            outs.append((y.float().detach(), x.grad.clone(), block.in_proj.weight.grad.clone()))
        errs = [rel(a, b) for a, b in zip(*outs)]
        name = "fp32" if dtype == torch.float32 else "bf16 autocast"
        rows.append((f"Mamba block {name}: {label} vs torch (out, dx, dW_in)", " / ".join(f"{e:.1e}" for e in errs),
                     f"< {tol:g}", "ok" if max(errs) < tol else "FAIL"))
    return rows


# ---- 5. kernels --------------------------------------------------------------------------------------------------
def kernel_check(device: str, dry_run: bool) -> list[tuple[str, str, str, str]]:
    """Rows (check, value, goal, verdict): CUDA kernels against the PyTorch path. In a dry run the 'kernel' side
    is selective_scan_ref (the per-step reference), so the comparison code runs on CPU."""
    from m2rec_lightning.ops.mamba import Mamba, _mamba_ssm_kernels
    from m2rec_lightning.ops.selective_scan import selective_scan, selective_scan_ref

    rows = []
    if dry_run:
        kernel_scan, backend, label = selective_scan_ref, "torch", "reference (dry run)"
    else:
        kernel_scan, inner, why = _mamba_ssm_kernels()
        if kernel_scan is None:
            return [("mamba_ssm import", why or "?", "importable", "FAIL")]
        backend = "cuda"
        label = "mamba_ssm" + (" + causal_conv1d (fused)" if inner is not None else " (scan only)")
    batch, dim, length, state = (2, 8, 16, 4) if dry_run else (16, 128, 200, 32)
    args = scan_inputs(batch, dim, length, state, device)
    ours = selective_scan(*args, delta_softplus=True)
    theirs = kernel_scan(*args, delta_softplus=True)
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    rows.append((f"selective scan fp32 vs {label}", f"max rel err {err:.1e}", "< 1e-4", "ok" if err < 1e-4 else "FAIL"))
    d_model = 8 if dry_run else 64
    torch.manual_seed(1)
    fast = Mamba(d_model, d_state=state, backend=backend).to(device)
    return rows + block_rows(fast, label, batch, length, device, selective_scan_ref if dry_run else None)


def kernel_subprocess(site: Path, device: str, lengths: list[int], batch: int, text_dim: int, timeout: float) -> list:
    """Run `--kernels-only` in a fresh interpreter with `site` on the path (a broken build cannot take this one down)."""
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, __file__, "--kernels-only", "--device", device, "--batch", str(batch), "--text-dim",
           str(text_dim), "--lengths", *map(str, lengths)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return [("CUDA kernels", f"timed out after {timeout:.0f} s", "", "FAIL")]
    rows = [tuple(line.split("\t")[1:]) for line in proc.stdout.splitlines() if line.startswith("ROW\t")]
    if proc.returncode != 0:
        rows.append(("CUDA kernels", (proc.stderr.strip().splitlines() or ["?"])[-1][:200], "", "FAIL"))
    return rows


def kernels_only(args) -> None:
    """Child process: agreement rows, then train-step times on the CUDA kernels; printed as ROW lines."""
    from throughput import measure_length

    for row in kernel_check(args.device, dry_run=False):
        print("ROW\t" + "\t".join(row), flush=True)
    for length in args.lengths:
        for r in measure_length(["m2rec", "mamba4rec"], length, args.batch, 3, ["train", "infer"], 3416,
                                args.text_dim, args.device, mamba_backend="cuda", log=lambda *_: None):
            print(f"ROW\t{r['model']} {r['mode']} L={length} B={r['batch']} on CUDA kernels\t"
                  f"{r['seq_per_s']:.0f} seq/s ({r['median_s'] * 1e3:.1f} ms)\t\tinfo", flush=True)


# ---- table -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no build: exercises the code paths")
    p.add_argument("--kernels-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--wheels", type=Path, default=BENCH / "gpu_wheels")
    p.add_argument("--site", type=Path, default=Path("/tmp/m2rec_gpu_site"))
    p.add_argument("--cuda-archs", default="90", help="comma-separated compute capabilities to compile for")
    p.add_argument("--build-cap-s", type=float, default=450.0, help="kill the kernel build after this long")
    p.add_argument("--budget-s", type=float, default=570.0, help="the whole script's wall-time budget")
    p.add_argument("--fit-cap-s", type=float, default=200.0, help="wall-time cap of the ML-1M full fit")
    p.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 800, 3200])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--ml1m", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "m2rec_gpu_check_data")
    args = p.parse_args(argv)
    if args.kernels_only:
        kernels_only(args)
        return
    from throughput import DEFAULT_BATCH, machine, measure_length, ratio_lines

    start = time.perf_counter()
    if args.dry_run:
        args.device, args.lengths, args.batch, args.fit_cap_s = "cpu", [16, 32], 4, 30.0
        batch_for = {length: args.batch for length in args.lengths}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check needs CUDA (use --dry-run on a CPU machine)")
        batch_for = {length: min(args.batch, DEFAULT_BATCH.get(length, args.batch) * 4) for length in args.lengths}
    build_log = Path(tempfile.gettempdir()) / "m2rec_gpu_build.log"
    build = None if args.dry_run else start_build(args.wheels, args.site, args.cuda_archs, build_log)
    rows: list[tuple[str, str, str, str]] = []

    throughput_rows = []
    for length in args.lengths:
        throughput_rows += measure_length(["m2rec", "mamba4rec", "sasrec"], length, batch_for[length], 3,
                                          ["train", "infer", "infer_full"], 3416, args.text_dim, args.device, "torch",
                                          log=lambda *_: None)
    get = {(r["model"], r["mode"], r["length"]): r for r in throughput_rows}
    for r in throughput_rows:
        rows.append((f"{r['model']} {r['mode']} L={r['length']} B={r['batch']} (torch scan)",
                     f"{r['seq_per_s']:.0f} seq/s, {r['median_s'] * 1e3:.1f} ms, {r['peak_mem_mb']:.0f} MB", "", "info"))
    for length in args.lengths:
        m, s = get[("m2rec", "train", length)], get[("sasrec", "train", length)]
        goal, limit = ("<= 1.5x", 1.5) if length <= 200 else ("< 1x (from L=800 on)", 1.0)
        ratio = m["median_s"] / s["median_s"]
        rows.append((f"M2Rec / SASRec train time, L={length}", f"{ratio:.2f}x", goal, "ok" if ratio <= limit else "FAIL"))
        mi, si = get[("m2rec", "infer", length)], get[("sasrec", "infer", length)]
        ratio = mi["seq_per_s"] / si["seq_per_s"]
        ok = "ok" if ratio >= 1.2 else "FAIL"
        rows.append((f"M2Rec / SASRec inference seq/s, L={length}", f"{ratio:.2f}x",
                     ">= 1.2x at L=200" if length == 200 else "", ok if length == 200 else "info"))

    # 2b. the Triton scan: checked first; its throughput, and the backend of the epoch and the fit when it passes
    try:
        triton_rows = triton_check(args.device, small=args.dry_run)
    except Exception as e:  # a Triton compile or launch error is a finding, not a reason to lose the other rows
        triton_rows = [("Triton scan", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", "runs", "FAIL")]
    rows += triton_rows
    triton_ok = all(r[3] == "ok" for r in triton_rows)
    # a dry run interprets the Triton kernels on the CPU: fine for checks, far too slow for an epoch and a fit
    backend = "triton" if triton_ok and not args.dry_run else "torch"
    if triton_ok:
        # interpreted on a CPU a single step takes many seconds: the dry run checks the kernels but times nothing
        for length in [] if args.dry_run else args.lengths:
            triton_tp = measure_length(["m2rec", "mamba4rec"], length, batch_for[length], 3,
                                       ["train", "infer", "infer_full"], 3416, args.text_dim, args.device, "triton",
                                       log=lambda *_: None)
            for r in triton_tp:
                rows.append((f"{r['model']} {r['mode']} L={length} B={r['batch']} (Triton scan)",
                             f"{r['seq_per_s']:.0f} seq/s, {r['median_s'] * 1e3:.1f} ms, {r['peak_mem_mb']:.0f} MB",
                             "", "info"))
            tri = {(r["model"], r["mode"]): r for r in triton_tp}
            sasrec_train, sasrec_infer = get[("sasrec", "train", length)], get[("sasrec", "infer", length)]
            ratio = tri[("m2rec", "train")]["median_s"] / sasrec_train["median_s"]
            goal, limit = ("<= 1.5x", 1.5) if length <= 200 else ("< 1x (from L=800 on)", 1.0)
            rows.append((f"M2Rec (Triton) / SASRec train time, L={length}", f"{ratio:.2f}x", goal,
                         "ok" if ratio <= limit else "FAIL"))
            ratio = tri[("m2rec", "infer")]["seq_per_s"] / sasrec_infer["seq_per_s"]
            rows.append((f"M2Rec (Triton) / SASRec inference seq/s, L={length}", f"{ratio:.2f}x",
                         ">= 1.2x at L=200" if length == 200 else "",
                         ("ok" if ratio >= 1.2 else "FAIL") if length == 200 else "info"))

    path, label = ml1m_file(args.ml1m, tiny=args.dry_run)
    max_len, eval_batch = (16, 32) if args.dry_run else (200, 1024)
    dm = ml1m_datamodule(path, max_len, args.batch, eval_batch, args.data_dir)
    seconds, steps = epoch_time(dm, args.device, args.text_dim, backend)
    rows.append((f"ML-1M epoch, M2Rec ({backend} scan), {label}, {steps} steps of B={args.batch}", f"{seconds:.2f} s",
                 "<= 1 s", "ok" if seconds <= 1.0 else "FAIL"))
    left = args.budget_s - (time.perf_counter() - start) - 60  # keep a minute for the kernel check
    fit = full_fit(dm, args.device, args.text_dim, backend, min(args.fit_cap_s, max(left - 120, 10)),
                   200 if not args.dry_run else 2)
    verdict = "ok" if fit["wall_s"] < 300 and (fit["early_stopped"] or args.dry_run) else "FAIL"
    rows.append((f"ML-1M full fit, M2Rec ({backend} scan), {label}",
                 f"{fit['wall_s']:.0f} s, {fit['epochs']} epochs, early stopped: {fit['early_stopped']}"
                 f"{' (hit the cap)' if fit['capped'] else ''}, best val NDCG@10 {fit['best']:.4f}",
                 "< 300 s to early stop", verdict))

    status = finish_build(build, start + args.build_cap_s, build_log)
    rows.append(("kernel build (mamba_ssm, causal_conv1d; sm_" + args.cuda_archs + ")",
                 f"{status}; {time.perf_counter() - start:.0f} s into the run", "", "ok" if status == "ok" else
                 ("info" if args.dry_run else "FAIL")))
    if args.dry_run:
        rows += kernel_check("cpu", dry_run=True)
    elif status == "ok":
        left = args.budget_s - (time.perf_counter() - start)
        rows += kernel_subprocess(args.site, args.device, [200], batch_for.get(200, args.batch), args.text_dim, left)

    lines = [f"# gpu_check{' (DRY RUN, CPU, tiny sizes: numbers mean nothing)' if args.dry_run else ''}", "",
             f"Machine: {machine(args.device)}; total {time.perf_counter() - start:.0f} s. The kernel build ran on "
             "the CPUs during the timings.", "", "| check | value | goal | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", *ratio_lines(throughput_rows)]
    print("\n".join(lines))
    shutil.rmtree(args.data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
