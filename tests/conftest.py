"""Shared pytest fixtures. Keep this file small and generic; append, don't rewrite."""

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    """A freshly seeded NumPy generator: each test sees the same numbers on every run."""
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run torch on one thread: for tiny tensors the thread pool only adds sync cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
