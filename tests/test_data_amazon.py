"""Amazon 2014 / 2018 / 2023 readers on fixture files written in the official formats."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from datamodules import Amazon2014, Amazon2018, Amazon2023, DataFormatError
from datamodules.sources.amazon import read_review_lines


def write_gz(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def review_2014(user, item, day):
    return json.dumps({"reviewerID": user, "asin": item, "reviewerName": "N", "helpful": [0, 0],
                       "reviewText": "Great.", "overall": 4.0, "summary": "ok", "unixReviewTime": day,
                       "reviewTime": "01 18, 2014"})


# user A: three items on the same day (ties keep file order) + one earlier; user B: four items; C: two items
REVIEWS = [("A", "B0002", 200), ("B", "B0001", 50), ("A", "B0003", 200), ("A", "B0001", 100), ("A", "B0004", 200),
           ("B", "B0002", 60), ("C", "B0009", 10), ("B", "B0003", 70), ("C", "B0001", 20), ("B", "B0004", 80)]

META_2014 = [
    "{'asin': 'B0001', 'title': \"L'Oreal Paris Lipstick\", 'price': 7.5, 'brand': \"L'Oreal\", "
    "'categories': [['Beauty', 'Makeup', 'Lips'], ['Beauty', 'Makeup', 'Face']], "
    "'related': {'also_bought': ['B0002']}, 'description': 'A lipstick.'}",
    "{'asin': 'B0002', 'title': 'Nail Polish', 'categories': [['Beauty']], 'salesRank': {'Beauty': 12}}",
    "{'asin': 'B0099', 'title': 'not reviewed'}",
    "{'asin': 'B0003', 'description': 'only a description', 'categories': [[]]}",
]


@pytest.fixture
def mirror_2014(tmp_path):
    folder = tmp_path / "mirror"
    write_gz(folder / "reviews_Beauty_5.json.gz", [review_2014(*r) for r in REVIEWS])
    write_gz(folder / "meta_Beauty.json.gz", META_2014)
    return folder


def test_amazon2014_download_parse_and_text(mirror_2014, tmp_path):
    dm = Amazon2014("Beauty", base_url=mirror_2014.as_uri(), data_dir=str(tmp_path / "data"),
                    min_user_interactions=3, min_item_interactions=2)
    assert dm.name == "amazon2014-Beauty"
    # C has 2 reviews -> removed by the user 3-core; then B0009 has none
    assert dm.user_ids.tolist() == ["A", "B"]
    assert (tmp_path / "data" / "amazon2014-Beauty" / "meta_Beauty.json.gz").is_file()
    raw = lambda u: [dm.item_ids[i] for i in dm.sequence(u)]  # noqa: E731
    assert raw(0) == ["B0001", "B0002", "B0003", "B0004"]  # day 100, then the day-200 ties in file order
    assert raw(1) == ["B0001", "B0002", "B0003", "B0004"]
    text = dict(zip(dm.item_ids[1:].tolist(), dm.item_text[1:]))
    assert text["B0001"] == {"title": "L'Oreal Paris Lipstick", "brand": "L'Oreal",
                             "categories": ["Beauty", "Makeup", "Lips", "Face"], "description": "A lipstick.",
                             "price": "7.50"}
    assert text["B0002"] == {"title": "Nail Polish", "categories": ["Beauty"]}
    assert text["B0003"] == {"description": "only a description"}
    assert text["B0004"] is None
    assert dm.stats["items_without_text"] == 1
    assert dm.stats["kcore"]["rounds"][0]["users_removed"] == 1


def test_amazon2014_without_text_skips_metadata(mirror_2014, tmp_path):
    dm = Amazon2014("Beauty", base_url=mirror_2014.as_uri(), data_dir=str(tmp_path / "d"), with_text=False,
                    min_user_interactions=0, min_item_interactions=0)
    assert dm.num_users == 2 and dm.item_text is None  # C (2 reviews) cannot be split
    assert not (tmp_path / "d" / "amazon2014-Beauty" / "meta_Beauty.json.gz").exists()


def test_amazon2018_formats(tmp_path):
    folder = tmp_path / "mirror"
    write_gz(folder / "categoryFilesSmall" / "All_Beauty_5.json.gz",
             [json.dumps({"overall": 5.0, "verified": True, "reviewTime": "x", "reviewerID": u, "asin": i,
                          "style": {"Size:": " 1"}, "unixReviewTime": t}) for u, i, t in REVIEWS])
    write_gz(folder / "metaFiles2" / "meta_All_Beauty.json.gz", [
        json.dumps({"category": ["All Beauty", "Hair"], "description": ["Para one.", "Para two."],
                    "title": "Shampoo &amp; Conditioner", "brand": "Acme", "price": "$12.99", "asin": "B0001"}),
        json.dumps({"title": "Brush", "price": ".a-box-inner{background-color:#fff;}", "asin": "B0002"}),
    ])
    dm = Amazon2018("All_Beauty", base_url=folder.as_uri(), data_dir=str(tmp_path / "data"),
                    min_user_interactions=0, min_item_interactions=0)
    text = dict(zip(dm.item_ids[1:].tolist(), dm.item_text[1:]))
    assert text["B0001"] == {"title": "Shampoo & Conditioner", "brand": "Acme", "categories": ["All Beauty", "Hair"],
                             "description": "Para one. Para two.", "price": "$12.99"}
    assert text["B0002"] == {"title": "Brush"}  # scraped CSS in price is not a price


def _review_2023(user, parent, ms):
    return json.dumps({"rating": 5.0, "title": "t", "text": "x", "images": [], "asin": parent + "-child",
                       "parent_asin": parent, "user_id": user, "timestamp": ms, "helpful_vote": 0,
                       "verified_purchase": True})


META_2023 = [json.dumps({"main_category": "All Beauty", "title": "Serum", "average_rating": 4.5, "rating_number": 3,
                         "features": ["Vitamin C", ""], "description": ["Brightens."], "price": 19.0, "images": [],
                         "videos": [], "store": "Glow Co", "categories": [], "parent_asin": "P1",
                         "details": {"Item Form": "Liquid", "UPC": None}, "bought_together": None})]


@pytest.fixture
def files_2023(tmp_path):
    rows = [("U1", "P1", 1588687728923), ("U1", "P2", 1588687728000), ("U1", "P3", 1600000000000),
            ("U2", "P1", 1500000000000), ("U2", "P2", 1500000000001), ("U2", "P3", 1500000000002)]
    folder = tmp_path / "mirror"
    write_gz(folder / "review_categories" / "All_Beauty.jsonl.gz", [_review_2023(*r) for r in rows])
    write_gz(folder / "meta_categories" / "meta_All_Beauty.jsonl.gz", META_2023)
    return folder


def test_amazon2023_jsonl(files_2023, tmp_path):
    dm = Amazon2023("All_Beauty", base_url=files_2023.as_uri(), data_dir=str(tmp_path / "data"),
                    min_user_interactions=0, min_item_interactions=0)
    assert [dm.item_ids[i] for i in dm.sequence(0)] == ["P2", "P1", "P3"]  # millisecond order
    text = dict(zip(dm.item_ids[1:].tolist(), dm.item_text[1:]))
    assert text["P1"] == {"title": "Serum", "brand": "Glow Co", "features": ["Vitamin C"],
                          "description": "Brightens.", "details": ["Item Form: Liquid"], "price": "19.00"}
    assert dm.stats["items_without_text"] == 2


def test_amazon2023_from_the_hub(files_2023, tmp_path, monkeypatch):
    import huggingface_hub

    fetched = []

    def fake_download(repo_id, filename, repo_type, local_dir):
        assert repo_id == "McAuley-Lab/Amazon-Reviews-2023" and repo_type == "dataset"
        fetched.append(filename)
        source = files_2023 / (Path(filename).relative_to("raw").as_posix() + ".gz")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(source, "rb") as f, open(target, "wb") as out:
            shutil.copyfileobj(f, out)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    dm = Amazon2023("All_Beauty", source="hf", data_dir=str(tmp_path / "data"), min_user_interactions=0,
                    min_item_interactions=0)
    assert dm.num_items == 3 and dm.item_text[dm.item_ids.tolist().index("P1")]["title"] == "Serum"
    assert fetched == ["raw/review_categories/All_Beauty.jsonl", "raw/meta_categories/meta_All_Beauty.jsonl"]


@pytest.mark.parametrize("line,message", [
    ('{"reviewerID": "A", "asin": "B1", "unixReviewTime": 5', r"reviews.json.gz:3: not valid JSON"),
    ('{"reviewerID": "A", "asin": "B1"}', r"reviews.json.gz:3: field 'unixReviewTime' is missing"),
    ('{"reviewerID": "A", "asin": "B1", "unixReviewTime": "May 5"}',
     r"reviews.json.gz:3: field 'unixReviewTime' is not an integer"),
])
def test_review_errors_name_file_and_line(tmp_path, line, message):
    good = review_2014("A", "B0", 1)
    path = write_gz(tmp_path / "reviews.json.gz", [good, good, line])
    with pytest.raises(DataFormatError, match=message):
        read_review_lines(path, "reviewerID", "asin", "unixReviewTime")


def test_bad_metadata_line_is_reported(tmp_path, mirror_2014):
    write_gz(mirror_2014 / "meta_Beauty.json.gz", [META_2014[0], "{'asin': 'B0002', 'title': 'unterminated}"])
    dm = Amazon2014("Beauty", base_url=mirror_2014.as_uri(), data_dir=str(tmp_path / "data"),
                    min_user_interactions=0, min_item_interactions=0)
    with pytest.raises(DataFormatError, match=r"meta_Beauty.json.gz:2: cannot parse the record of B0002"):
        dm.num_items
