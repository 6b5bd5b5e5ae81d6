"""The statistics command: LightningCLI-style config merging, printed report, saved JSON."""

import json

from datamodules import SequenceFile
from datamodules.stats import load_datamodule, main


def test_configs_merge_like_lightningcli_and_stats_are_saved(tmp_path, capsys):
    seqs = tmp_path / "toy.txt"
    seqs.write_text("1 1 2 3 4\n2 2 3 4 1\n3 3 4 1 2\n4 1 3 1\n")
    first = tmp_path / "download.yaml"
    first.write_text("model:\n  d_model: 64\ntrainer:\n  max_epochs: 3\n"
                     "data:\n  class_path: datamodules.Amazon2014\n  init_args:\n    category: Beauty\n"
                     f"    max_len: 7\n    data_dir: {tmp_path / 'data'}\n    min_item_interactions: 3\n")
    second = tmp_path / "offline.yaml"
    second.write_text(f"data:\n  class_path: datamodules.SequenceFile\n  init_args:\n    path: {seqs}\n"
                      "    min_user_interactions: 0\n")
    dm = load_datamodule([first, second])
    # the class changed; arguments the new class also accepts were kept, as LightningCLI keeps them
    assert isinstance(dm, SequenceFile) and dm.max_len == 7 and dm.min_item_interactions == 3
    assert dm.min_user_interactions == 0
    main(["--config", str(first), "--config", str(second)])
    out = capsys.readouterr().out
    assert "users              4" in out and "items              4" in out and "interactions       15" in out
    assert "duplicates         1 (dropped 0)" in out  # user 4 repeats item 1 (no timestamps: a repeated pair)
    saved = json.loads((dm.processed_dir / "stats.json").read_text())
    assert saved["interactions"] == 15 and saved["kcore"]["min_item_interactions"] == 3
