"""Fuzzing the `m2rec` command line (issue 55): generated argument lists over generated input files (sequence files,
CSV and Parquet interaction tables with junk ids, bad timestamps, empty or binary files) run in-process through
`m2rec_lightning.cli.main`. Every case must end in success or in SystemExit with a one-line `error:` (status 1 for a
user error, 2 for a command line that does not parse, 0 for --print_config): never another exception, never a
traceback.

Marked slow. Run in full (1,000 cases, a few minutes on two cores) with

    .venv/bin/python -m pytest -q -m slow tests/test_reliability_fuzz.py

Without `-m slow` (the default suite) it runs a 25-case smoke version; M2REC_FUZZ_EXAMPLES=N sets the count.
Cases are mostly `m2rec stats` and parse-only paths (cheap); about one in eight fits a tiny SASRec for one epoch.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2rec_lightning.cli import main

FULL_EXAMPLES, SMOKE_EXAMPLES = 1000, 25

KNOWN_FINDINGS: list[tuple[str, str, str]] = [
    # (exception type name, message pattern, the file whose fix is pending): each is a traceback a user can still
    # get; the fuzz counts them instead of failing, until the file's owner turns them into one-line errors. None now.
]
FOUND: dict[str, int] = {}

# ------------------------------------------------------------------------------------------------ input files

JUNK = ["", "x", "-1", "-0", "1e3", "nan", "inf", "9" * 25, "ü", "1,2", "0x10", "None", "\x00", "😀", " "]
ids = st.one_of(st.integers(1, 12).map(str), st.integers(-3, 10**20).map(str), st.sampled_from(JUNK))
timestamps = st.one_of(
    st.integers(0, 2**40).map(str), st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["2020-01-01", "2020-13-45", "2021-06-01T12:00:00Z", "", "yesterday", "1e308", "-1"]),
)


@st.composite
def sequence_file(draw) -> bytes:
    """user_items lines: mostly well formed (so some cases get far), with junk tokens, blank lines, tabs, binary."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=80))
    lines = []
    for user in range(draw(st.integers(0, 25))):
        if draw(st.integers(0, 4)):
            items = draw(st.lists(st.integers(1, 15), min_size=1, max_size=12))
            lines.append(" ".join(map(str, [user + 1, *items])))
        else:
            lines.append(draw(st.sampled_from([" ", "\t"])).join(draw(st.lists(ids, max_size=6))))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@st.composite
def table_rows(draw) -> list[tuple[str, str, str]]:
    rows = []
    for user in range(draw(st.integers(0, 15))):
        for _ in range(draw(st.integers(1, 8))):
            good = draw(st.integers(0, 5)) > 0
            rows.append((str(user) if good else draw(ids), str(draw(st.integers(1, 10))) if good else draw(ids),
                         str(draw(st.integers(0, 10**6))) if good else draw(timestamps)))
    return rows


HEADERS = [("user_id", "item_id", "timestamp"), ("user_id", "item_id"), ("user", "item", "time"), ()]


@st.composite
def csv_table(draw) -> bytes:
    header = draw(st.sampled_from(HEADERS))
    rows = draw(table_rows())
    text = ([",".join(header)] if header else []) + [",".join(r[: len(header) or 3]) for r in rows]
    return "\n".join(text).encode("utf-8", "surrogatepass")


@st.composite
def parquet_table(draw) -> pd.DataFrame:
    rows = draw(table_rows())
    users, items, stamps = (list(col) for col in zip(*rows)) if rows else ([], [], [])
    kind = draw(st.sampled_from(["int", "str", "float", "datetime", "mixed"]))
    if kind == "int":
        numbers = pd.to_numeric(pd.Series(stamps, dtype=object), errors="coerce").replace([np.inf, -np.inf], np.nan)
        stamp = numbers.fillna(0).clip(-(2**62), 2**62).astype(np.int64)
    elif kind == "float":
        stamp = pd.to_numeric(pd.Series(stamps, dtype=object), errors="coerce")
    elif kind == "datetime":
        stamp = pd.to_datetime(pd.to_numeric(pd.Series(stamps, dtype=object), errors="coerce"), unit="s",
                               errors="coerce")
    else:
        stamp = pd.Series(stamps, dtype=object).astype(str)
    frame = pd.DataFrame({"user_id": pd.Series(users, dtype=object).astype(str), "item_id": items, "timestamp": stamp})
    drop = draw(st.sampled_from([None, None, None, "timestamp", "item_id"]))
    return frame.drop(columns=[drop]) if drop else frame


# ------------------------------------------------------------------------------------------------ command lines


def mostly(valid: list[str], invalid: list[str]) -> st.SearchStrategy[str]:
    """A valid value three times in four, so that most cases get past the parser to the data."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(invalid))


DATA_OPTIONS = {
    "--data.max_len": mostly(["1", "3", "50"], ["0", "-1", "x", "2.5"]),
    "--data.min_user_interactions": mostly(["0", "2", "5"], ["-1", "many"]),
    "--data.min_item_interactions": mostly(["0", "1", "3", "99"], ["-2"]),
    "--data.batch_size": mostly(["1", "8"], ["0", "true"]),
    "--data.train_window": mostly(["recent", "random", "all"], ["bogus"]),
    "--data.train_mode": mostly(["all_positions", "prefix"], ["both"]),
    "--data.tie_order": mostly(["file", "shuffle"], ["random"]),
    "--data.drop_duplicates": mostly(["true", "false"], ["maybe"]),
    "--data.name": mostly(["a", "b c", "ü"], ["", "../up"]),
    "--data.text": mostly(["null"], ["{}"]),
}
SEQUENCE_OPTIONS = {
    "--data.format": mostly(["user_items", "user_item_pairs"], ["pairs"]),
    "--data.encoding": mostly(["utf-8", "latin-1"], ["no-such-codec"]),
}
TABLE_OPTIONS = {
    "--data.timestamp_column": mostly(["timestamp", "null"], ["time", "nope"]),
    "--data.user_column": mostly(["user_id"], ["user"]),
    "--data.format": mostly(["auto", "csv", "parquet", "tsv"], ["xlsx"]),
}
UNKNOWN_OPTIONS = [["--data.nonsense", "3"], ["--bogus"], ["--trainer.max_epochs", "x"], ["--data"]]

TINY_MODEL = ["--model", "m2rec_lightning.SequentialRecommender", "--model.encoder", "m2rec_lightning.SASRecEncoder",
              "--model.encoder.hidden_size", "8", "--model.encoder.n_layers", "1", "--model.encoder.inner_size", "16",
              "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.logger", "false"]


@dataclass
class Case:
    kind: str  # sequences, csv, parquet
    content: bytes | pd.DataFrame
    suffix: str
    subcommand: str
    options: list[str]


@st.composite
def cases(draw) -> Case:
    kind = draw(st.sampled_from(["sequences", "sequences", "csv", "parquet"]))
    content = {"sequences": sequence_file, "csv": csv_table, "parquet": parquet_table}[kind]()
    suffix = {"sequences": ".txt", "csv": draw(st.sampled_from([".csv", ".csv", ".txt"])), "parquet": ".parquet"}[kind]
    subcommand = draw(st.sampled_from(["stats"] * 12 + ["fit"] * 2 + ["print_config", "test", "predict"]))
    choices = {**DATA_OPTIONS, **(SEQUENCE_OPTIONS if kind == "sequences" else TABLE_OPTIONS)}
    chosen = draw(st.lists(st.sampled_from(sorted(choices)), max_size=4, unique=True))
    options = [x for name in chosen for x in (name, draw(choices[name]))]
    if draw(st.integers(0, 9)) == 0:  # an option that does not exist, or lacks its value
        options += draw(st.sampled_from(UNKNOWN_OPTIONS))
    return Case(kind, draw(content), suffix, subcommand, options)


def argv(case: Case, folder: Path) -> list[str]:
    path = folder / f"input{case.suffix}"
    if isinstance(case.content, pd.DataFrame):
        case.content.to_parquet(path)
    else:
        path.write_bytes(case.content)
    cls = "datamodules.SequenceFile" if case.kind == "sequences" else "datamodules.InteractionTable"
    data = ["--data", cls, "--data.path", str(path), "--data.data_dir", str(folder / "data"),
            "--data.min_user_interactions", "0", "--data.min_item_interactions", "0", *case.options]
    if case.subcommand == "stats":
        return ["stats", *data]
    run = ["--run_dir", str(folder / "run")]
    if case.subcommand == "print_config":
        return ["fit", *TINY_MODEL, *data, *run, "--print_config"]
    extra = ["--untrained"] if case.subcommand == "predict" else []  # test runs without a checkpoint: refused
    return [case.subcommand, *TINY_MODEL, *data, *run, *extra]


def run_case(case: Case) -> None:
    with tempfile.TemporaryDirectory(prefix="m2rec-fuzz-") as tmp:
        args = argv(case, Path(tmp))
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exit_:
                code = exit_.code
            except Exception as exc:  # noqa: BLE001 - a known finding is counted, anything else fails the case
                known = next((where for name, pattern, where in KNOWN_FINDINGS
                              if type(exc).__name__ == name and re.search(pattern, str(exc))), None)
                if known is None:
                    raise
                FOUND[known] = FOUND.get(known, 0) + 1
                return
        stderr = err.getvalue()
        context = f"{args}\n--- stderr ---\n{stderr[-3000:]}"
        assert code in (0, 1, 2), context
        assert "Traceback" not in stderr, context
        if code:
            lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
            assert len(lines) == 1, context
            # the message is one line; at most a hint in parentheses follows it (no usage text, no indented detail)
            after = stderr.split(lines[0], 1)[1].strip().splitlines()
            assert len(after) <= 1 and all(line.startswith("(") for line in after), context


def example_count(config: pytest.Config) -> int:
    if os.environ.get("M2REC_FUZZ_EXAMPLES"):
        return int(os.environ["M2REC_FUZZ_EXAMPLES"])
    return FULL_EXAMPLES if "slow" in (config.getoption("markexpr", "") or "") else SMOKE_EXAMPLES


@pytest.mark.slow
def test_the_cli_never_fails_with_a_traceback(request, monkeypatch):
    monkeypatch.delenv("M2REC_TRACEBACK", raising=False)
    logging.getLogger("lightning").setLevel(logging.ERROR)  # seed / GPU notices, once per case
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    @settings(max_examples=example_count(request.config), deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases())
    def fuzz(case: Case) -> None:
        run_case(case)

    fuzz()
    if FOUND:  # shown with -s or -rA; the report of issue 55 lists them
        print(f"known findings (tracebacks pending a fix in files outside the CLI): {FOUND}")
