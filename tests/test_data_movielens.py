"""MovieLens-1M: parsers on fixture files in the official formats, the download flow, and clear errors."""

import hashlib
import zipfile

import numpy as np
import pytest

from datamodules import DataFormatError, DownloadError, MovieLens1M
from datamodules.download import git_blob_sha1
from datamodules.sources import movielens
from datamodules.sources.movielens import read_movies_dat, read_ratings_dat
from datamodules.stats import format_stats

# UserID::MovieID::Rating::Timestamp, as in ratings.dat (user 2 rates 3 movies in the same second)
RATINGS = """1::1193::5::978300760
1::661::3::978302109
1::914::3::978301968
2::1357::5::978298709
2::3068::4::978299000
2::1537::4::978299000
2::647::3::978299000
2::2194::4::978299351
"""
MOVIES = ("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
          "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
          "914::My Fair Lady (1964)::Musical|Romance\n"
          "1357::Shine (1996)::Drama|Romance\n"
          "3068::Verdict, The (1982)::Drama\n"
          "1537::Shall We Dance? (Shall We Dansu?) (1996)::Comedy\n"
          "647::Courage Under Fire (1996)::Drama|War\n"
          "2194::Misérables, Les (1995)::Drama|Musical\n")


@pytest.fixture
def ml_dir(tmp_path):
    folder = tmp_path / "data" / "ml-1m"
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_text(RATINGS)
    (folder / "movies.dat").write_bytes(MOVIES.encode("latin-1"))
    return folder


def test_ratings_dat_parser(ml_dir):
    inter = read_ratings_dat(ml_dir / "ratings.dat")
    assert inter.users.tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    assert inter.items.tolist() == [1193, 661, 914, 1357, 3068, 1537, 647, 2194]
    assert inter.timestamps.tolist()[:2] == [978300760, 978302109]
    assert inter.timestamps.dtype == np.int64


def test_movies_dat_is_latin1_and_split_into_fields(ml_dir):
    movies = read_movies_dat(ml_dir / "movies.dat")
    assert movies["2194"] == {"title": "Misérables, Les", "year": "1995", "genres": ["Drama", "Musical"]}
    assert movies["1537"]["title"] == "Shall We Dance? (Shall We Dansu?)"
    assert movies["661"]["genres"] == ["Animation", "Children's", "Musical"]
    with pytest.raises(DataFormatError, match=r"movies.dat:8: byte 0xe9 .* not valid utf-8.*encoding="):
        read_movies_dat(ml_dir / "movies.dat", encoding="utf-8")


def test_datamodule_from_local_files(ml_dir):
    dm = MovieLens1M(data_dir=str(ml_dir.parent), min_user_interactions=0, min_item_interactions=0, max_len=3)
    assert dm.name == "ml-1m" and dm.num_users == 2 and dm.num_items == 8
    # user 1 sorted by time: 1193 (760), 914 (1968), 661 (2109); user 2: ties at 978299000 keep file order
    assert [dm.item_ids[i] for i in dm.sequence(0)] == [1193, 914, 661]
    assert [dm.item_ids[i] for i in dm.sequence(1)] == [1357, 3068, 1537, 647, 2194]
    batch = next(iter(dm.test_dataloader()))
    raw = lambda ids: [dm.item_ids[i] if i else 0 for i in ids]  # noqa: E731
    assert raw(batch["input_ids"][1].tolist()) == [3068, 1537, 647]
    assert dm.item_ids[batch["target"][1]] == 2194
    assert dm.item_text[dm.sequence(1)[-1]]["title"] == "Misérables, Les"
    assert dm.stats["items_without_text"] == 0
    # user 2's three same-second ratings: 2 ties; its validation target (647) is one of them, its test target not
    assert (dm.stats["tied_interactions"], dm.stats["users_with_tied_test_target"],
            dm.stats["users_with_tied_validation_target"]) == (2, 0, 1)
    assert "timestamp ties     2 interactions" in format_stats(dm.stats)


def test_tie_order_shuffle_reorders_only_same_second_ratings_and_keys_its_own_cache(ml_dir):
    kwargs = dict(data_dir=str(ml_dir.parent), min_user_interactions=0, min_item_interactions=0, max_len=3)
    file_order = MovieLens1M(**kwargs)
    shuffled = MovieLens1M(tie_order="shuffle", **kwargs)
    assert shuffled.processed_dir != file_order.processed_dir and shuffled.stats["tie_order"] == "shuffle"
    assert [shuffled.item_ids[i] for i in shuffled.sequence(0)] == [1193, 914, 661]  # no ties: time order
    user2 = [shuffled.item_ids[i] for i in shuffled.sequence(1)]
    assert user2[0] == 1357 and user2[-1] == 2194 and sorted(user2[1:4]) == [647, 1537, 3068]
    assert user2 == [shuffled.item_ids[i] for i in MovieLens1M(tie_order="shuffle", **kwargs).sequence(1)]
    with pytest.raises(ValueError, match="tie_order must be 'file' or 'shuffle'"):
        MovieLens1M(tie_order="random", **kwargs)


@pytest.mark.parametrize("content,message", [
    ("1::1193::5::978300760\n1::661::3\n", r"ratings.dat:2: expected 4 '::'-separated fields"),
    ("1::1193::5::978300760\n\n1::661::3::97830x109\n", r"ratings.dat:3: field 'Timestamp' is not an integer"),
    ("1::1193::5::978300760\nu2::661::3::978302109\n", r"ratings.dat:2: field 'UserID' is not an integer"),
    ("1::1193::5::978300760::extra\n", r"ratings.dat:1: expected 4 '::'-separated fields"),
    ("\n\n", r"ratings.dat: file is empty"),
])
def test_ratings_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "ratings.dat"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message):
        read_ratings_dat(path)


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    dm = MovieLens1M(data_dir=str(tmp_path), url=(tmp_path / "nowhere.zip").as_uri())
    with pytest.raises(DownloadError, match=r"by hand and save it as .*ratings.dat and movies.dat"):
        dm.num_items


def _official_like_zip(tmp_path, ratings=RATINGS):
    archive = tmp_path / "mirror" / "ml-1m.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", ratings)
        zf.writestr("ml-1m/movies.dat", MOVIES.encode("latin-1"))
        zf.writestr("ml-1m/users.dat", "1::F::1::10::48067\n")
        zf.writestr("ml-1m/README", "SUMMARY\n")
    return archive


def test_download_verifies_zip_and_ratings_blob(tmp_path, monkeypatch):
    archive = _official_like_zip(tmp_path)
    data_dir = tmp_path / "data"
    dm = MovieLens1M(data_dir=str(data_dir), url=archive.as_uri(), min_user_interactions=0, min_item_interactions=0)
    with pytest.raises(DownloadError, match="md5"):  # our fixture zip is not the official one
        dm.num_items
    monkeypatch.setattr(movielens, "ML1M_ZIP_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(DownloadError, match="git blob .* not the official"):
        MovieLens1M(data_dir=str(data_dir), url=archive.as_uri()).num_items
    assert not (data_dir / "ml-1m" / "ratings.dat").exists()
    (tmp_path / "check.dat").write_text(RATINGS)
    monkeypatch.setattr(movielens, "RATINGS_GIT_BLOB", git_blob_sha1(tmp_path / "check.dat"))
    dm = MovieLens1M(data_dir=str(data_dir), url=archive.as_uri(), min_user_interactions=0, min_item_interactions=0)
    assert dm.num_items == 8
    assert sorted(p.name for p in (data_dir / "ml-1m").iterdir() if not p.name.startswith(".")) == [
        "README", "ml-1m.zip", "movies.dat", "processed", "ratings.dat", "users.dat"]
