"""InteractionTable (CSV / TSV / Parquet) and the documented subclassing example."""

import re

import pandas as pd
import pytest

from datamodules import DataFormatError, InteractionTable
from datamodules.sources import custom


def make(path, tmp_path, **kwargs):
    return InteractionTable(str(path), data_dir=str(tmp_path / "data"), min_user_interactions=0,
                            min_item_interactions=0, **kwargs)


def raw_sequence(dm, user):
    return [dm.item_ids[i] for i in dm.sequence(user)]


def test_csv_with_integer_timestamps_and_extra_columns(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,rating\n"
                    "u1,apple,30,5\nu2,pear,1,3\nu1,kiwi,10,4\nu1,fig,30,1\nu2,apple,2,2\nu2,kiwi,3,5\n")
    dm = make(path, tmp_path)
    assert dm.user_ids.tolist() == ["u1", "u2"]
    assert raw_sequence(dm, 0) == ["kiwi", "apple", "fig"]  # t=10, then the t=30 tie in file order
    assert raw_sequence(dm, 1) == ["pear", "apple", "kiwi"]


def test_tsv_without_timestamps_uses_file_order(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("uid\tiid\n1\t9\n1\t8\n1\t7\n")
    dm = make(path, tmp_path, user_column="uid", item_column="iid", timestamp_column=None)
    assert raw_sequence(dm, 0) == [9, 8, 7] and dm.item_ids.dtype.kind == "i"


def test_parquet_with_datetimes_and_item_text(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({
        "user": [3, 3, 3, 4, 4, 4],
        "item": ["b", "a", "c", "a", "b", "c"],
        "when": pd.to_datetime(["2024-01-03", "2024-01-01", "2024-01-02", "2024-02-01", "2024-02-02", "2024-02-03"]),
    }).to_parquet(path)
    texts = tmp_path / "items.parquet"
    pd.DataFrame({"item": ["a", "b"], "title": ["Apple", None], "tags": [["x", "y"], []]}).to_parquet(texts)
    dm = make(path, tmp_path, user_column="user", item_column="item", timestamp_column="when",
              item_text_path=str(texts))
    assert raw_sequence(dm, 0) == ["a", "c", "b"]
    assert dm.item_text[1] == {"title": "Apple", "tags": ["x", "y"]} and dm.item_text[3] == {}
    assert dm.item_ids[3] == "b"
    assert dm.stats["items_without_text"] == 2  # "b" has an empty row, "c" has none


def test_iso_date_strings(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n1,a,2024-05-01T10:00:00Z\n1,b,2024-04-01T10:00:00+02:00\n"
                    "1,c,2024-04-01T09:00:00Z\n")
    dm = make(path, tmp_path)
    assert raw_sequence(dm, 0) == ["b", "c", "a"]  # 08:00Z < 09:00Z < May


@pytest.mark.parametrize("content,message", [
    ("user_id,item,timestamp\n1,a,1\n", r"log.csv:1: missing column\(s\) \['item_id'\]"),
    ("user_id,item_id,timestamp\n1,a,1\n\n1,b,yesterday\n", r"log.csv:4: timestamp 'yesterday' is not a number"),
    ("user_id,item_id,timestamp\n1,a,1\n1,,2\n", r"log.csv:3: field 'item_id' is empty"),
    ("user_id,item_id,timestamp\n1,a,1,9\n", r"log.csv:2: expected 3 ','-separated fields"),
    ("", r"log.csv: file is empty"),
])
def test_table_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "log.csv"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message):
        make(path, tmp_path).num_items


def test_a_tsv_line_of_bare_tabs_is_an_error_at_its_line(tmp_path):
    """pandas reads a line of tabs as a row of empty fields (a blank line it skips): the error must name that line,
    not let the empty row through (found by test_custom_tables)."""
    path = tmp_path / "log.tsv"
    path.write_text("user_id\titem_id\ttimestamp\n1\ta\t1\n\t\t\n \n1\tb\t2\n")
    with pytest.raises(DataFormatError, match=r"log.tsv:3: field 'user_id' is empty"):
        make(path, tmp_path).num_items


def test_documented_subclass_example_runs(tmp_path):
    # Execute the example from the module docstring verbatim, so the documentation cannot rot.
    code = re.search(r"::\n\n(.*?)\n\nUse it like", custom.__doc__, re.S).group(1)
    namespace = {}
    exec(compile("\n".join(line[4:] for line in code.splitlines()), "custom-example", "exec"), namespace)
    RetailrocketViews = namespace["RetailrocketViews"]
    folder = tmp_path / "data" / "retailrocket"
    with pytest.raises(FileNotFoundError, match="events.csv not found. Get events.csv from Kaggle"):
        RetailrocketViews(data_dir=str(tmp_path / "data")).num_items
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events.csv").write_text(
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n1433224214164,992329,view,248676,\n"
        "1433221999827,257597,addtocart,355908,\n1433222147345,257597,view,11,\n"
        "1433223000000,257597,view,12,\n1433221000000,992329,view,13,\n1433225000000,992329,view,14,\n")
    dm = RetailrocketViews(data_dir=str(tmp_path / "data"), min_user_interactions=0, min_item_interactions=0)
    assert dm.num_users == 2 and dm.stats["reader"] == {"other_events_skipped": 1}
    assert [dm.item_ids[i] for i in dm.sequence(0)] == [355908, 11, 12]
    assert [dm.item_ids[i] for i in dm.sequence(1)] == [13, 248676, 14]
    batch = next(iter(dm.test_dataloader()))
    assert batch["target"].tolist() == [dm.sequence(0)[-1], dm.sequence(1)[-1]]
