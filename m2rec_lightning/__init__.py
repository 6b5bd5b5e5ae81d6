"""M2Rec for PyTorch Lightning: encoders (plain nn.Modules), the LightningModule and the `m2rec` CLI."""
from .averaging import EMAWeightAveraging
from .m2rec import M2RecEncoder
from .mamba import Mamba
from .metrics import RankingMetrics
from .module import SequentialRecommender
from .sasrec import SASRecEncoder

__all__ = ["EMAWeightAveraging", "M2RecEncoder", "Mamba", "RankingMetrics", "SASRecEncoder", "SequentialRecommender"]
