import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

# Test tensors are tiny and pytest-xdist runs one worker per core: more threads per worker only oversubscribes.
torch.set_num_threads(1)
# Without CUDA the Triton kernels run in Triton's interpreter. The flag must be set before triton is first imported
# (lightning imports it), or triton's own library functions stay compiled-only and the interpreted kernels fail.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


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


def load_benchmark(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def synthetic_sequence_file(tmp_path: Path) -> tuple[Path, dict[int, list[int]]]:
    """A data config (YAML) over a synthetic sequence file, and its sequences: 40 users over 25 items with a skewed
    (Zipf-like) item distribution, so popularity has ties and a clear order."""
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 26)
    sequences = {}
    for user in range(1, 41):
        length = int(rng.integers(5, 12))
        sequences[user] = [int(i) for i in rng.choice(np.arange(101, 126), size=length, p=weights / weights.sum())]
    path = tmp_path / "seq.txt"
    path.write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in sequences.items()))
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n  class_path: datamodules.SequenceFile\n  init_args:\n"
        f"    path: {path}\n    data_dir: {tmp_path / 'data'}\n    item_text_path: null\n    text: null\n"
        "    min_user_interactions: 0\n    min_item_interactions: 0\n    batch_size: 8\n    eval_batch_size: 16\n"
        "    max_len: 50\n"
    )
    return config, sequences
