"""experiments/time_to_quality.py on hand-made quality-table records."""
from __future__ import annotations

import json
from importlib import import_module


def run(model: str, curve: list[float], prefix: bool = False) -> dict:
    history = [{"epoch": i, "seconds": 10.0 * (i + 1), "val": {"NDCG@10": v}} for i, v in enumerate(curve)]
    best = max(range(len(curve)), key=curve.__getitem__)
    return {"model": model, "seed": 1, "history": history, "best_epoch": best, "epochs_run": len(curve),
            "val_at_best": {"NDCG@10": curve[best]}, "config_files": [],
            "config": "data:\n  init_args:\n    train_mode: " + ("prefix" if prefix else "all_positions") + "\n"}


def test_target_is_the_reference_best_and_first_crossing_is_reported(tmp_path, capsys):
    results = tmp_path / "runs.json"
    results.write_text(json.dumps({"dataset": "beauty", "runs": [
        run("sasrec", [0.01, 0.03, 0.05, 0.04]),            # best 0.05 at epoch 3, then early-stopped
        run("m2rec", [0.02, 0.05, 0.06]),                   # reaches 0.05 at epoch 2
        run("sasrec_recbole", [0.01, 0.02, 0.049], True),   # never reaches it
        run("m2rec", [0.01, 0.02, 0.05]) | {"setting": {"encoder.dropout": "0.5"}},  # a search winner's row
    ]}))
    out = tmp_path / "ttq.md"
    import_module("experiments.time_to_quality").main([str(results), "--reference", "sasrec", "--out", str(out)])
    text = out.read_text()
    assert "NDCG@10 >= 0.0500 (best validation NDCG@10 of sasrec (seed 1, best at epoch 3 of 4))" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 3 | 30 |" in rows["sasrec"]
    assert "| 2 | 20 |" in rows["m2rec"]
    assert "| prefix | not reached |" in rows["sasrec_recbole"]
    assert "| 3 | 30 |" in rows["m2rec [encoder.dropout=0.5]"]  # named apart from the plain m2rec row


def test_fixed_targets_each_get_a_table(tmp_path):
    results = tmp_path / "runs.json"
    results.write_text(json.dumps({"dataset": "beauty", "runs": [run("sasrec", [0.01, 0.03, 0.05])]}))
    out = tmp_path / "ttq.md"
    import_module("experiments.time_to_quality").main([str(results), "--target", "0.02", "--also", "0.04", "0.07", "--out", str(out)])
    tables = out.read_text().split("Target: ")[1:]
    assert [t.split(" ")[3] for t in tables] == ["0.0200", "0.0400", "0.0700"]
    assert "| 2 | 20 |" in tables[0] and "| 3 | 30 |" in tables[1] and "not reached" in tables[2]


def test_a_tuned_reference_is_named_with_its_setting(tmp_path):
    """The best reference run may be a search winner; the target line must say so, not pass it off as the default."""
    results = tmp_path / "runs.json"
    results.write_text(json.dumps({"dataset": "beauty", "runs": [
        run("sasrec", [0.01, 0.04]), run("sasrec", [0.02, 0.06, 0.05]) | {"setting": {"encoder.hidden_size": "512"}}]}))
    out = tmp_path / "ttq.md"
    import_module("experiments.time_to_quality").main([str(results), "--reference", "sasrec", "--out", str(out)])
    assert "NDCG@10 >= 0.0600 (best validation NDCG@10 of sasrec [encoder.hidden_size=512] (seed 1" in out.read_text()


def test_the_target_line_says_what_ended_the_reference_run(tmp_path):
    """A reference whose best epoch is not its last may have run its whole fixed horizon: it must not read as
    early-stopped."""
    results = tmp_path / "runs.json"
    results.write_text(json.dumps({"dataset": "beauty", "runs": [
        run("sasrec", [0.01, 0.06, 0.05]) | {"ended_by": "max_epochs"}]}))
    out = tmp_path / "ttq.md"
    import_module("experiments.time_to_quality").main([str(results), "--reference", "sasrec", "--out", str(out)])
    text = out.read_text()
    assert "(seed 1, best at epoch 2 of 3, ended by max_epochs))" in text and "stopped early" not in text


def test_cpu_time_and_a_time_measured_elsewhere_are_reported(tmp_path):
    r = run("m2rec", [0.01, 0.03, 0.05])
    for e in r["history"]:
        e["cpu_seconds"] = e["seconds"] / 2
    results = tmp_path / "runs.json"
    results.write_text(json.dumps({"dataset": "beauty", "runs": [r, run("sasrec", [0.01, 0.02])]}))
    out = tmp_path / "ttq.md"
    import_module("experiments.time_to_quality").main(
        [str(results), "--target", "0.03", "--versus", "RecBole SASRec", "600", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert "| CPU time to reach (s) | times sooner than RecBole SASRec (600 s) |" in out.read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert "| 2 | 20 | 10 | 30.0 |" in rows["m2rec"]  # epoch 2 at 20 s wall, 10 s CPU: 600 / 20 = 30x
    assert "| not reached | — | — | — |" in rows["sasrec"]
