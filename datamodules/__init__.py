"""The dataset collection: leave-one-out LightningDataModules for sequential recommendation benchmarks."""

from .amazon import Amazon2014, Amazon2018
from .amazon2023 import Amazon2023
from .base import SequentialDataModule
from .custom import InteractionTable
from .download import DownloadError, UnsafeArchiveError
from .movielens import MovieLens1M
from .parsing import DataFormatError
from .preprocess import Interactions
from .samplers import UnpaddedDistributedSampler
from .sequence_files import SequenceFile

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
