"""benchmarks/scale.py: its workers run at tiny sizes, the loss swap reaches `SequentialRecommender.loss`, the dense
and chunked evaluation paths rank alike, and an allocation beyond the worker's cap is recorded, not fatal. No
wall-clock assertions."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import load_benchmark

import m2rec_lightning.module as module_impl
from m2rec_lightning.ops.chunked_softmax import chunked_cross_entropy

TINY = {"num_items": 60, "batch": 4, "length": 8, "steps": 2, "warmup": 1, "negatives": 16, "seed": 0}


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale")


@pytest.mark.parametrize("model", ["m2rec", "sasrec"])
@pytest.mark.parametrize("loss", ["dense", "chunked", "sampled"])
def test_train_worker_runs_every_model_and_loss(scale, model, loss):
    out = scale.train_point({**TINY, "kind": "train", "model": model, "loss": loss})
    assert out["status"] == "ok"
    assert len(out["times"]) == 2 and len(out["losses"]) == 3  # one warm-up + two timed steps
    assert all(math.isfinite(v) for v in out["losses"])
    assert out["item_table_bytes"] == (TINY["num_items"] + 1) * 64 * 4
    assert out["grad_bytes"] == out["param_bytes"]  # every parameter got a (dense) gradient
    # exp_avg and exp_avg_sq, plus a 0-dim step counter per parameter
    assert 0 <= out["adam_state_bytes"] - 2 * out["param_bytes"] <= 8 * 64
    assert {"forward", "optimizer"} <= set(out["phase_peaks"])
    assert any(p.startswith("backward:") for p in out["phase_peaks"])
    assert module_impl.chunked_cross_entropy is chunked_cross_entropy  # the swap is undone


def test_loss_swap_reaches_the_module(scale):
    """dense and chunked give the same loss through `module.loss`, and the swap is undone on exit."""
    model = scale.build_model("m2rec", 40, 8)
    model.eval()  # no dropout: the same hidden states for every loss
    ids = torch.randint(1, 41, (3, 9), generator=torch.Generator().manual_seed(0))
    hidden = model.encode(ids[:, :-1])

    def loss(name):
        with scale.use_loss(name):
            return model.loss(hidden, ids[:, 1:], ids[:, :-1]).item()

    chunked, dense = loss("chunked"), loss("dense")
    assert dense == pytest.approx(chunked, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"), scale.use_loss("nope"):
        pass
    assert module_impl.chunked_cross_entropy is chunked_cross_entropy


def test_eval_worker_paths_rank_alike(scale):
    spec = {**TINY, "kind": "eval", "model": "m2rec", "batch": 16, "reps": 1, "k": 5}
    chunked, dense = (scale.eval_point({**spec, "path": path}) for path in ("chunked", "dense"))
    assert chunked["status"] == dense["status"] == "ok"
    assert chunked["rank_sum"] == dense["rank_sum"]
    assert chunked["top_score_sum"] == pytest.approx(dense["top_score_sum"], rel=1e-6)


def test_ratio_worker(scale):
    out = scale.ratio_point({**TINY, "kind": "ratio", "model": "sasrec", "rounds": 2})
    assert out["status"] == "ok" and len(out["times"]["dense"]) == len(out["times"]["chunked"]) == 2
    assert out["ratio"] > 0


def test_zipf_ids_and_log_q(scale):
    zipf = scale.Zipf(1000, 1.0, seed=0)
    ids = zipf.sample((200, 50), torch.Generator().manual_seed(0))
    assert ids.min() >= 1 and ids.max() <= 1000
    log_q = zipf.log_q()
    assert log_q.exp().sum().item() == pytest.approx(1.0, rel=1e-5)
    # the most frequent id is the one the law makes most probable
    assert torch.bincount(ids.flatten()).argmax().item() == log_q.argmax().item() + 1


def test_worker_process_reports_peak_rss(scale):
    out = scale.run_point({**TINY, "kind": "train", "model": "sasrec", "loss": "chunked", "steps": 1,
                           "mem_cap_gb": 20, "threads": 1})
    assert out["status"] == "ok" and out["returncode"] == 0 and out["torch_threads"] == 1
    assert out["peak_rss"] >= out["rss_before_last_step"] > 0  # the child's own ru_maxrss, from wait4


def test_allocation_beyond_the_cap_is_recorded(scale):
    """The dense loss at N=10^6 with M=1,600 targets asks for 6.4 GB of logits: under a 3 GB address-space cap the
    worker reports the failed request instead of dying."""
    out = scale.run_point({"kind": "train", "model": "sasrec", "loss": "dense", "num_items": 10**6, "batch": 32,
                           "length": 50, "steps": 1, "warmup": 1, "seed": 0, "mem_cap_gb": 3, "threads": 1})
    assert out["status"] == "oom" and out["returncode"] == 0
    assert out["requested_bytes"] == 32 * 50 * 10**6 * 4
    assert out["failed_in"] == "forward"  # the loss is computed in the forward phase (training_loss)
    assert "fails to allocate 6.40 GB under the 3 GB cap" in scale.status_cell(out)


def test_report_renders_from_a_record(scale, tmp_path):
    spec = {**TINY, "mem_cap_gb": 20, "threads": 1}
    record = {"meta": {"command": "python benchmarks/scale.py --test", "batch": 4, "length": 8, "eval_batch": 16,
                       "k": 5, "negatives": 16, "sampler": "popularity", "zipf": 1.0, "threads": 1,
                       "mem_cap_gb": 20, "machine": "test machine"},
              "train": [], "eval": [], "ratio": []}
    for loss in ("dense", "chunked"):
        s = {**spec, "kind": "train", "model": "m2rec", "loss": loss}
        record["train"].append({**scale.train_point(s), "spec": s, "peak_rss": 10**9})
    failed = {**spec, "kind": "train", "model": "m2rec", "loss": "dense", "num_items": 10**7}
    record["train"].append({"status": "oom", "requested_bytes": 128 * 10**9, "spec": failed, "peak_rss": 2 * 10**9})
    text = scale.markdown(record)
    assert "Command: `python benchmarks/scale.py --test`" in text and "Machine: test machine" in text
    assert "fails to allocate 128.00 GB under the 20 GB cap" in text
    assert "## Where the memory goes" in text and "## What it shows" in text
    scale.plot(record, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0
