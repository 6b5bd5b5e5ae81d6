"""The dataset collection: leave-one-out LightningDataModules for sequential recommendation benchmarks."""

from .base import SequentialDataModule
from .download import DownloadError, UnsafeArchiveError
from .parsing import DataFormatError
from .preprocess import Interactions
from .samplers import UnpaddedDistributedSampler
from .sources.amazon import Amazon2014, Amazon2018
from .sources.amazon2023 import Amazon2023
from .sources.custom import InteractionTable
from .sources.movielens import MovieLens1M
from .sources.sequence_files import SequenceFile

__all__ = [
    "Amazon2014",
    "Amazon2018",
    "Amazon2023",
    "DataFormatError",
    "DownloadError",
    "InteractionTable",
    "Interactions",
    "MovieLens1M",
    "SequenceFile",
    "SequentialDataModule",
    "UnpaddedDistributedSampler",
    "UnsafeArchiveError",
]
