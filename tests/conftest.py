"""Shared fixtures. Every test runs on one intra-op thread: the tiny models gain nothing from more,
and on a busy 2-core machine two OpenMP threads fighting other processes run many times slower.
tools/bench.py sets the thread count itself; the count is restored after every test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
