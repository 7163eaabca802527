"""Test setup: Triton runs under its CPU interpreter when no GPU is visible; GPU tests skip cleanly."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decoration runs (FEASIBILITY 2c).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTAT_BACKEND", None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    import fastat._backend as backend
    import fastat._dispatch as dispatch

    saved = backend._requested
    dispatch.forget_probes()
    yield
    backend._requested = saved
