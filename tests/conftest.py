from pathlib import Path

import pytest
import torch

# Test tensors are tiny and pytest-xdist runs one worker per core: more threads per worker only oversubscribes.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The licensed benchmark files beside the checkout (never copied into the repo)."""
    if not (SHARED_DATA / "beauty" / "Beauty.txt").exists():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
