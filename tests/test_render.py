"""experiments/render.py: the committed README blocks and docs/results pages are what the records render to (the CI
check), and the renderer computes, groups and places what it shows correctly (on synthetic trees in tmp_path)."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from experiments import render

ROOT = Path(__file__).resolve().parents[1]
MARKERS = [f"<!-- {m} -->" for m in ("results:beauty", "/results:beauty", "results:ml-1m", "/results:ml-1m", "speed",
                                     "/speed")]
README = "# Title\n\nIntro.\n\n" + "".join(f"{a}\nold\n{b}\n\nText.\n\n" for a, b in zip(MARKERS[::2], MARKERS[1::2]))
RATIOS = ("| L | batch | M2Rec / SASRec train time | Mamba4Rec / SASRec train time | M2Rec / SASRec inference seq/s | "
          "Mamba4Rec / SASRec inference seq/s |")
THROUGHPUT = f"""# Throughput

Command: `python benchmarks/throughput.py --lengths 50 200 800`

Machine: x86_64, 2 CPUs, torch 2.13.0+cpu, 1 threads, load average 2.1 at the end. Shared.

Ratios (train: time per step, lower = faster than SASRec; inference: sequences/s, higher = faster):

{RATIOS}
| ---: | ---: | ---: | ---: | ---: | ---: |
| 50 | 32 | 1.46 | 1.01 | 0.35 | 0.66 |
| 200 | 32 | 1.17 | 0.96 | 0.45 | 0.90 |
| 800 | 8 | 0.73 | 0.62 | 0.84 | 1.58 |
"""


def run(model: str, seed: int | None, ndcg: float, setting: dict | None = None, search: str | None = None,
        options: str = "seen_bias: false", budget: tuple[int, int] = (200, 10), val: float = 0.05) -> dict:
    """A quality-record run with every metric at `ndcg` (HR@10 = 2 x ndcg) and the model options `options`."""
    test = {m: ndcg * (2 if m.startswith("HR") else 1) for m in render.METRICS}
    return {"model": model, "seed": seed, "test": test, "val_at_best": {"NDCG@10": val},
            "config_files": ["configs/beauty.yaml", "configs/shared/beauty.yaml", f"configs/models/{model}.yaml",
                             "../../tmp/maxtime.yaml"],
            "budget": {"max_epochs": budget[0], "patience": budget[1]},
            "config": f"model:\n  class_path: m2rec_lightning.SequentialRecommender\n  init_args:\n    {options}\n",
            **({"setting": setting, "search": search} if setting else {})}


def make_tree(root: Path, records: dict[str, list[dict]]) -> Path:
    """A repository tree with the Beauty quality records `records` (name -> runs), one throughput record and a
    README with every marker."""
    folder = root / "experiments" / "results" / "beauty"
    folder.mkdir(parents=True)
    for name, runs in records.items():
        (folder / name).write_text(json.dumps({"dataset": "beauty", "notes": [], "runs": runs}))
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "benchmarks" / "results" / "throughput.md").write_text(THROUGHPUT)
    (root / "README.md").write_text(README)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path, {"quality_beauty.json": [run("popularity", None, 0.005),
                                                        run("m2rec", 42, 0.0401), run("m2rec", 43, 0.0413)]})


# ---- the CI check: what is committed is what the records give ----------------------------------------------------

@pytest.fixture(scope="module")
def rendered() -> dict[Path, str]:
    return render.render(ROOT, readme=False)


def test_committed_docs_pages_equal_their_rendering(rendered):
    assert render.differences(ROOT, rendered) == [], "run: python -m experiments.render"


def test_committed_readme_blocks_equal_their_rendering():
    text = (ROOT / "README.md").read_text()
    if not any(marker in text for marker in MARKERS):
        pytest.skip("README.md has no results markers yet (the README rewrite adds them); drop this skip then")
    outputs = render.render(ROOT)  # raises MarkerError when only some markers are there
    readme = ROOT / "README.md"
    assert render.differences(ROOT, {readme: outputs[readme]}) == [], "run: python -m experiments.render"


def test_the_repository_headline_holds_the_tuned_m2rec_row_of_each_dataset():
    """TUNED_SEARCHES must still name the searches whose winner the records hold (a renamed file would silently
    turn the row into "no record")."""
    for dataset in render.DATASETS:
        rows = render.quality_records(ROOT, dataset)
        rows = [row for path, record in rows.items() for row in render.record_rows(path, record)]
        tuned = [row for group, name, row, _ in render.headline_rows(ROOT, dataset, rows) if name == "M2Rec tuned"]
        assert len(tuned) == 1 and tuned[0] is not None, dataset
        assert tuned[0].runs[0]["search"].rsplit("/", 1)[1] in render.TUNED_SEARCHES[dataset]
        assert len(tuned[0].seeds) == 3


# ---- unit tests on synthetic trees --------------------------------------------------------------------------------

def test_two_seeds_render_their_mean_and_sample_std(tree):
    text = render.headline(tree, "beauty", None)
    values = [0.0401, 0.0413]
    ndcg = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    hr = f"{statistics.mean([2 * v for v in values]):.4f} ± {statistics.stdev([2 * v for v in values]):.4f}"
    line = next(line for line in text.splitlines() if line.startswith("| M2Rec released |"))
    assert line.startswith(f"| M2Rec released | {hr} | {ndcg} | {ndcg} | 42, 43 |")
    assert "`experiments/results/beauty/quality_beauty.json`" in line
    # wall-time caps (outside the repository) and the offline data override are not the row's config
    assert "maxtime" not in line and "configs/shared" not in line
    assert "no record" in next(line for line in text.splitlines() if line.startswith("| SASRec released |"))
    assert render.PROTOCOL in text


def test_rows_with_the_seen_score_are_grouped_apart(tmp_path):
    runs = [run("sasrec", 42, 0.04, setting={"lr": "0.002"}, search="s.json"),
            run("sasrec", 42, 0.06, setting={"lr": "0.002", "seen_bias": "true"}, search="s.json",
                options="seen_bias: true"),
            run("mamba4rec", 42, 0.07, setting={"seen_score": "history"}, search="s.json",
                options="seen_score:\n      class_path: m2rec_lightning.SeenItemScore\n      init_args:\n"
                        "        scope: history")]
    root = make_tree(tmp_path, {"quality_x.json": runs})
    rows = [row for path, record in render.quality_records(root, "beauty").items()
            for row in render.record_rows(path, record)]
    assert [row.group for row in rows] == ["plain", "seen", "history"]
    placed = {(group, name): row for group, name, row, _ in render.headline_rows(root, "beauty", rows) if row}
    assert placed[("plain", "SASRec tuned")].runs[0]["test"]["NDCG@10"] == 0.04
    assert placed[("seen", "SASRec tuned")].runs[0]["test"]["NDCG@10"] == 0.06
    assert placed[("history", "Mamba4Rec tuned")].runs[0]["test"]["NDCG@10"] == 0.07
    lines = render.headline(root, "beauty", None).splitlines()
    heading = lines.index(f"| **{render.GROUPS['seen']}** | | | | | | |")
    assert lines[heading + 1].startswith("| SASRec tuned | 0.1200 | 0.0600 |")


def test_a_row_held_by_several_records_is_taken_from_the_longest_budget_and_the_others_named(tmp_path):
    root = make_tree(tmp_path, {"quality_a.json": [run("sasrec", 42, 0.02, budget=(6, 6))],
                                "quality_b.json": [run("sasrec", 42, 0.04, budget=(200, 5))]})
    line = next(line for line in render.headline(root, "beauty", None).splitlines()
                if line.startswith("| SASRec released |"))
    assert "| 0.0400 |" in line
    assert "`experiments/results/beauty/quality_b.json` (also in `quality_a.json`)" in line


def test_a_missing_marker_is_a_clear_error(tree, capsys):
    (tree / "README.md").write_text(README.replace("<!-- /speed -->\n", ""))
    with pytest.raises(render.MarkerError, match="<!-- /speed -->"):
        render.render(tree)
    assert render.main(["--root", str(tree)]) == 2
    assert "<!-- /speed -->" in capsys.readouterr().err
    assert (tree / "README.md").read_text() == README.replace("<!-- /speed -->\n", "")  # left alone
    render.render(tree, readme=False)  # the docs pages render without the README


def test_check_fails_on_an_altered_block_or_page_and_names_it(tree, capsys):
    assert render.main(["--check", "--root", str(tree)]) == 1  # nothing rendered yet
    assert render.main(["--root", str(tree)]) == 0
    assert render.main(["--check", "--root", str(tree)]) == 0
    readme = (tree / "README.md").read_text()
    assert readme.startswith("# Title\n\nIntro.\n\n<!-- results:beauty -->\n") and "\nold\n" not in readme
    (tree / "README.md").write_text(readme.replace("| M2Rec released | 0.", "| M2Rec released | 1."))
    capsys.readouterr()
    assert render.main(["--check", "--root", str(tree)]) == 1
    err = capsys.readouterr().err
    assert "README.md block <!-- results:beauty -->" in err and "speed" not in err
    (tree / "README.md").write_text(readme)
    page = tree / "docs" / "results" / "speed.md"
    page.write_text(page.read_text() + "edited\n")
    assert render.main(["--check", "--root", str(tree)]) == 1
    assert "docs/results/speed.md" in capsys.readouterr().err


def test_the_speed_block_takes_the_ratios_at_200_and_the_longest_length(tree):
    block = render.speed_block(tree)
    rows = [line for line in block.splitlines() if line.startswith("| x86_64")]
    assert [row.split(" | ")[1] for row in rows] == ["200", "800"]
    assert rows[0].startswith("| x86_64, 2 CPUs, 1 threads | 200 | 32 | 1.17 | 0.96 | 0.45 | 0.90 |")
    page = render.speed_page(tree)
    assert page.startswith(render.GENERATED) and "| 50 | 32 | 1.46 |" in page


def test_a_record_without_a_newer_ratio_column_shows_a_dash_there_and_the_clock_is_named(tree):
    results = tree / "benchmarks" / "results"
    (results / "throughput_old.md").write_text(THROUGHPUT)  # sorts after throughput.md, whose header is used
    newer = (THROUGHPUT.replace(RATIOS, RATIOS + " M2Rec / Mamba4Rec train time |").replace("800`", "800 --clock cpu`")
             .replace("| ---: |\n", "| ---: | ---: |\n", 1)
             .replace("| 200 | 32 | 1.17 | 0.96 | 0.45 | 0.90 |", "| 200 | 32 | 1.17 | 0.96 | 0.45 | 0.90 | 1.22 |"))
    (results / "throughput.md").write_text(newer)
    rows = [line for line in render.speed_block(tree).splitlines() if line.startswith("| x86_64") and "| 200 |" in line]
    assert rows == ["| x86_64, 2 CPUs, 1 threads, CPU time | 200 | 32 | 1.17 | 0.96 | 0.45 | 0.90 | 1.22 | "
                    "`benchmarks/results/throughput.md` |",
                    "| x86_64, 2 CPUs, 1 threads | 200 | 32 | 1.17 | 0.96 | 0.45 | 0.90 | - | "
                    "`benchmarks/results/throughput_old.md` |"]


def test_every_generated_page_says_so_and_links_nothing_outside_docs(tree):
    shutil.copy(tree / "benchmarks" / "results" / "throughput.md", tree / "benchmarks" / "results" / "other.md")
    for path, text in render.render(tree, readme=False).items():
        assert text.startswith(render.GENERATED + "\n"), path
        assert "](" not in text, path  # records are named in code spans: mkdocs --strict rejects unknown links


def test_readme_stays_a_users_document_under_20_kb():
    """Results tables are generated into README.md; the narrative belongs in docs/, so the file stays small."""
    assert (ROOT / "README.md").stat().st_size < 20_000
