"""MovieLens-1M from the official GroupLens zip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import SequentialDataModule
from ..download import DownloadError, download_file, extract_archive, git_blob_sha1
from ..parsing import decode, parse_delimited, read_bytes, require_file
from ..preprocess import Interactions

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML1M_ZIP_MD5 = "c4d9eecfca2ab87c1945afe126590906"
RATINGS_GIT_BLOB = "77a7c4b150f588c23bb9e1f068aa996c0b413695"  # `git hash-object ratings.dat` of the official file


def _read_double_colon(path: Path, columns: list[str], int_columns: list[str], encoding: str):
    text = decode(read_bytes(path), path, encoding)
    # "::" never occurs inside a field of these files, so a one-character stand-in lets the C parser run.
    return parse_delimited(text.replace("::", "\t"), path, sep="\t", columns=columns, int_columns=int_columns,
                           shown_sep="::")


def read_ratings_dat(path: str | Path) -> Interactions:
    """``UserID::MovieID::Rating::Timestamp`` lines -> interactions (every rating counts as implicit feedback)."""
    columns = ["UserID", "MovieID", "Rating", "Timestamp"]
    frame = _read_double_colon(Path(path), columns, columns, "utf-8")
    return Interactions(frame["UserID"].to_numpy(), frame["MovieID"].to_numpy(), frame["Timestamp"].to_numpy())


def read_movies_dat(path: str | Path, encoding: str = "latin-1") -> dict[str, dict]:
    """``MovieID::Title (Year)::Genre|Genre`` lines (Latin-1 in the official files) -> text fields.

    Returns:
        {str(MovieID): {"title", "year", "genres"}}; ``year`` is omitted when the title has no trailing "(YYYY)",
        ``genres`` is a list (empty for "(no genres listed)").
    """
    path = Path(path)
    frame = _read_double_colon(path, ["MovieID", "Title", "Genres"], ["MovieID"], encoding)
    parts = frame["Title"].str.strip().str.extract(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)$")
    titles = parts["title"].fillna(frame["Title"].str.strip())
    table = {}
    for movie, title, year, genres in zip(frame["MovieID"].tolist(), titles.tolist(), parts["year"].tolist(),
                                          frame["Genres"].tolist()):
        fields = {"title": title}
        if isinstance(year, str):
            fields["year"] = year
        fields["genres"] = [g for g in genres.split("|") if g and g != "(no genres listed)"]
        table[str(movie)] = fields
    return table


class MovieLens1M(SequentialDataModule):
    """MovieLens-1M: 1,000,209 ratings of 3,706 movies by 6,040 users; 5-core gives 6,040 / 3,416 / 999,611.

    Downloads ``ml-1m.zip`` (md5-checked) into ``data_dir/ml-1m/`` and checks ``ratings.dat`` against its git blob
    id. Without internet, put ``ratings.dat`` and ``movies.dat`` in ``data_dir/ml-1m/`` yourself. Item text: title,
    year, genres.

    Args:
        url: where to get ``ml-1m.zip`` (a mirror, or a file:// URL).
        **kwargs: SequentialDataModule options (data_dir, max_len, filters, batch sizes, ...).
    """

    text_template = "movielens"

    def __init__(self, url: str = ML1M_URL, **kwargs):
        super().__init__(**kwargs)
        self.url = url

    @property
    def name(self) -> str:
        return "ml-1m"

    def raw_files(self) -> list[Path]:
        return [self.raw_dir / "ratings.dat", self.raw_dir / "movies.dat"]

    def download(self) -> None:
        if all(p.is_file() for p in self.raw_files()):
            return
        try:
            archive = download_file(self.url, self.raw_dir / "ml-1m.zip", md5=ML1M_ZIP_MD5)
        except DownloadError as e:
            raise DownloadError(f"{e} Or put ratings.dat and movies.dat from it into {self.raw_dir}.") from e
        extract_archive(archive, self.data_dir, ["ml-1m/ratings.dat", "ml-1m/movies.dat", "ml-1m/users.dat",
                                                 "ml-1m/README"])
        blob = git_blob_sha1(self.raw_dir / "ratings.dat")
        if blob != RATINGS_GIT_BLOB:
            (self.raw_dir / "ratings.dat").unlink()
            raise DownloadError(f"{self.raw_dir / 'ratings.dat'} from {archive} has git blob {blob}, expected "
                                f"{RATINGS_GIT_BLOB}: not the official MovieLens-1M ratings")

    def read_interactions(self) -> Interactions:
        hint = f"Pass data_dir so that <data_dir>/ml-1m/ holds it, or let MovieLens1M download {self.url}."
        return read_ratings_dat(require_file(self.raw_dir / "ratings.dat", hint))

    def read_item_text(self, raw_item_ids: np.ndarray) -> dict[str, dict]:
        return read_movies_dat(require_file(self.raw_dir / "movies.dat", "It comes with ml-1m.zip."))
