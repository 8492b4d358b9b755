"""Shared test setup: Triton interpreter on CPU, offline hub, the tiny model fixtures."""

import os

# Must precede any import of triton (kernel decorators read it at definition time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# Test helper modules (video_clips.py) import by name: importlib mode keeps tests/ off sys.path.
sys.path.insert(0, str(Path(__file__).parent))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from visioncoach.models.tokenizer import qwen25_tokenizer

    return qwen25_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    from visioncoach.models.tiny import build_processor

    return build_processor(tokenizer, max_pixels=16 * 28 * 28)


@pytest.fixture()
def tiny_model():
    """A fresh tiny random-weight Qwen2.5-VL (float32, sdpa), same weights every time."""
    from visioncoach.models.tiny import build_tiny_model

    return build_tiny_model(seed=0)
