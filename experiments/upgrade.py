"""Saved configs of older records in today's option names, so a recorded run can be rebuilt and compared.

Options that were removed (docs/experiments/removed-options.md) are dropped when they hold the value that had the
published model's behaviour, and refused otherwise: such a run is not reproducible with today's code. The four flags of
the learned seen-item score become the `seen_score` component they were regrouped into.
"""
from __future__ import annotations

import copy

# option -> the value at which it changed nothing
REMOVED_MODULE = {"contrastive_weight": 0.0, "contrastive_temperature": None, "score_temperature": None,
                  "item_bias": False, "check_finite": None}
REMOVED_ENCODER = {"initializer_range": 0.02, "item_dropout": 0.0, "text_output": None}
SEEN_SCORE = "m2rec_lightning.SeenItemScore"


def _drop(options: dict, removed: dict, where: str) -> None:
    for key, neutral in removed.items():
        if key in options:
            value = options.pop(key)
            if neutral is not None and value != neutral:
                raise ValueError(f"{where}.{key}={value!r} was removed from the code; this run cannot be rebuilt")


def seen_score(module: dict) -> dict | None:
    """The `seen_score` component of a module's saved options, from today's key or from the four old flags."""
    if "seen_score" in module:
        return module["seen_score"]
    if not module.get("seen_bias"):
        return None
    return {"class_path": SEEN_SCORE, "init_args": {"scope": module.get("seen_scope", "input"),
                                                    "detach": module.get("seen_bias_detach", False),
                                                    "lr": module.get("seen_bias_lr")}}


def upgrade_config(config: dict) -> dict:
    """A resolved LightningCLI config (as saved in a record's `config`) with today's model options."""
    config = copy.deepcopy(config)
    module = config["model"]["init_args"]
    _drop(module, REMOVED_MODULE, "model")
    if "seen_score" not in module and "seen_bias" in module:
        module["seen_score"] = seen_score(module)
    for key in ("seen_bias", "seen_scope", "seen_bias_lr", "seen_bias_detach"):
        module.pop(key, None)
    encoder = module.get("encoder", {})
    if encoder.get("class_path", "").endswith("M2RecEncoder"):
        _drop(encoder.get("init_args", {}), REMOVED_ENCODER, "model.encoder")
        if encoder.get("init_args", {}).get("gate") == "sigmoid":
            raise ValueError("model.encoder.gate='sigmoid' was removed from the code; this run cannot be rebuilt")
    return config
