"""M2Rec for PyTorch Lightning: encoders (plain nn.Modules), the LightningModule and the `m2rec` CLI."""
from .metrics import RankingMetrics
from .models.m2rec import M2RecEncoder
from .models.sasrec import SASRecEncoder
from .module import SequentialRecommender
from .ops.mamba import Mamba
from .seen_score import SeenItemScore

__all__ = ["M2RecEncoder", "Mamba", "RankingMetrics", "SASRecEncoder", "SeenItemScore", "SequentialRecommender"]
