"""Test setup: Triton runs under its CPU interpreter when no GPU is visible; GPU tests skip cleanly."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit decoration runs (docs/design.md, testing without a GPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTAT_BACKEND", None)


def _runs_on_the_gpu(item) -> bool:
    """Tests of a module whose DEV is "cuda", or parametrised with device "cuda" (cross-backend)."""
    if getattr(getattr(item, "module", None), "DEV", None) == "cuda":
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("device") == "cuda"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # On a GPU machine `-m gpu` selects everything that touches the device, not only the explicit marks.
        for item in items:
            if "gpu" not in item.keywords and _runs_on_the_gpu(item):
                item.add_marker(pytest.mark.gpu)
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
