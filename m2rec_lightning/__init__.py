"""M2Rec for PyTorch Lightning: encoders (plain nn.Modules), the LightningModule and the `m2rec` CLI.

The exports load on first use, so `m2rec --help` answers without importing torch and Lightning."""
from importlib import import_module

_EXPORTS = {"M2RecEncoder": ".models.m2rec", "Mamba": ".ops.mamba", "RankingMetrics": ".metrics",
            "SampledSoftmax": ".sampled_softmax", "SASRecEncoder": ".models.sasrec", "SeenItemScore": ".seen_score",
            "SequentialRecommender": ".module"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
