"""Shared fixtures: tiny random models (fast, offline, deterministic)."""

import pytest

from migu.models import tiny_model, tiny_model_dir


@pytest.fixture
def tiny_llama():
    """A fresh (model, tokenizer): 2-layer Llama, hidden 32, byte-level tokenizer, seed 0."""
    return tiny_model("llama", seed=0)


@pytest.fixture
def tiny_gpt2():
    """A fresh (model, tokenizer): 2-layer GPT-2 (Conv1D projections), seed 0."""
    return tiny_model("gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A directory holding tiny_model("llama", seed=0) and its tokenizer, usable as model.name."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=0)
