"""SequenceFile formats and item-text tables on small fixture files, including the error paths."""

import pytest

from datamodules import DataFormatError, SequenceFile
from datamodules.item_tables import read_item_table
from datamodules.sources.sequence_files import read_user_item_pairs, read_user_items


def make(path, tmp_path, **kwargs):
    return SequenceFile(str(path), data_dir=str(tmp_path / "data"), min_user_interactions=0,
                        min_item_interactions=0, **kwargs)


def test_user_items_with_string_ids(tmp_path):
    path = tmp_path / "seqs.txt"
    path.write_text("alice i3 i1 i2\n\nbob i1 i1 i4 i2\ncarol\n")
    inter = read_user_items(path)
    assert inter.users.tolist() == ["alice"] * 3 + ["bob"] * 4
    assert inter.items.tolist() == ["i3", "i1", "i2", "i1", "i1", "i4", "i2"]
    assert inter.notes == {"users_without_items": 1}
    dm = make(path, tmp_path)
    assert dm.item_ids.tolist() == ["", "i3", "i1", "i2", "i4"] and dm.user_ids.tolist() == ["alice", "bob"]
    assert dm.stats["reader"]["users_without_items"] == 1
    assert dm.stats["duplicates"] == 1  # bob's repeated i1 (no timestamps: repeated pair), kept


def test_user_item_pairs_keep_file_order_per_user(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("1 10\n2 20\n1 11\n1 12\n2 21\n2 22\n1 13\n")
    dm = make(path, tmp_path, format="user_item_pairs", max_len=2)
    assert [dm.item_ids[i] for i in dm.sequence(0)] == [10, 11, 12, 13]
    batch = next(iter(dm.val_dataloader()))
    assert [dm.item_ids[i] for i in batch["input_ids"][0].tolist()] == [10, 11]
    assert dm.item_ids[batch["target"][0]] == 12
    assert batch["input_ids"][1].tolist()[1] == 0  # user 2 has one train item: right-padded


@pytest.mark.parametrize("reader,content,message", [
    (read_user_item_pairs, "1 10\n1 11 5\n", r"pairs.txt:2: expected 2 whitespace-separated fields"),
    (read_user_item_pairs, "", r"pairs.txt: file is empty"),
    (read_user_items, "1 2 3\n2 4 \xff\n", r"pairs.txt:2: byte 0xff at column 5 is not valid utf-8"),
    (read_user_items, "1\n2\n", r"pairs.txt: no interactions"),
])
def test_sequence_file_errors(tmp_path, reader, content, message):
    path = tmp_path / "pairs.txt"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataFormatError, match=message):
        reader(path)


def test_missing_sequence_file_says_which_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.txt not found.*--data.init_args.path"):
        make(tmp_path / "nope.txt", tmp_path).num_items


def test_tsv_item_table_with_empty_cells_and_quotes(tmp_path):
    table = tmp_path / "items.tsv"
    table.write_text('item_id\tasin\ttitle\tnote\n1\tA1\t"Quoted" title\tx\n2\tA2\t\ty\n3\tA3\tThird\t\n')
    text = read_item_table(table, id_column="item_id", text_columns=["title"])
    assert text == {"1": {"title": '"Quoted" title'}, "2": {}, "3": {"title": "Third"}}
    assert read_item_table(table)["3"] == {"asin": "A3", "title": "Third"}  # default: first column is the id
    with pytest.raises(DataFormatError, match=r"items.tsv: missing text column\(s\) \['name'\]"):
        read_item_table(table, id_column="item_id", text_columns=["name"])
    with pytest.raises(DataFormatError, match=r"items.tsv:1: missing column\(s\) \['id'\]"):
        read_item_table(table, id_column="id")


def test_csv_and_movielens_item_tables(tmp_path):
    csv_path = tmp_path / "items.csv"
    csv_path.write_text('id,title,brand\n7,"Comma, inside",Acme\n8,Plain,\n')
    assert read_item_table(csv_path) == {"7": {"title": "Comma, inside", "brand": "Acme"}, "8": {"title": "Plain"}}
    dat = tmp_path / "movies.dat"
    dat.write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Café (no year)::Drama\n".encode("latin-1"))
    assert read_item_table(dat) == {"1": {"title": "Toy Story", "year": "1995",
                                          "genres": ["Animation", "Children's", "Comedy"]},
                                    "2": {"title": "Café (no year)", "genres": ["Drama"]}}
    with pytest.raises(ValueError, match="pass the format argument"):
        read_item_table(tmp_path / "items.json")


def test_sequence_file_joins_item_text(tmp_path):
    path = tmp_path / "seqs.txt"
    path.write_text("1 1 2 3\n2 2 3 4\n")
    table = tmp_path / "items.tsv"
    table.write_text("s3rec_item_id\ttitle\n1\tOne\n2\t\n3\tThree\n")
    dm = make(path, tmp_path, item_text_path=str(table), item_id_column="s3rec_item_id", item_text_columns=["title"])
    assert dm.item_text == [None, {"title": "One"}, {}, {"title": "Three"}, None]
    assert dm.stats["items_without_text"] == 2
