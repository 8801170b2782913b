"""Backend selection shared by the op dispatchers."""

import pytest
import torch

from kernels.common import pick_backend

AVAILABLE = {"fast": lambda d: d.type == "cuda", "other": lambda d: True, "reference": lambda d: True}


def test_auto_takes_first_available(monkeypatch):
    monkeypatch.delenv("HYLA_BACKEND", raising=False)
    assert pick_backend("auto", torch.device("cpu"), AVAILABLE) == "other"
    assert pick_backend("auto", torch.device("cuda"), AVAILABLE) == "fast"


def test_env_override_replaces_auto_only(monkeypatch):
    monkeypatch.setenv("HYLA_BACKEND", "reference")
    assert pick_backend("auto", torch.device("cuda"), AVAILABLE) == "reference"
    assert pick_backend("other", torch.device("cuda"), AVAILABLE) == "other"  # explicit choice wins
    monkeypatch.setenv("HYLA_BACKEND", "fast")  # not available on CPU: auto falls back to the order
    assert pick_backend("auto", torch.device("cpu"), AVAILABLE) == "other"


def test_explicit_backend_is_validated():
    with pytest.raises(ValueError, match="unknown backend"):
        pick_backend("nope", torch.device("cpu"), AVAILABLE)
    with pytest.raises(ValueError, match="not available"):
        pick_backend("fast", torch.device("cpu"), AVAILABLE)
