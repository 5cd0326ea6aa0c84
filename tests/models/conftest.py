"""Model tests run tiny batches: one intra-op thread is as fast and never thrashes a busy box."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def native_kernel():
    """medlite's C scan kernel. Skipped only where it cannot be built by design (no compiler,
    or switched off); a build that fails or disagrees with the reference fails the test."""
    from medlite.models.ops import native
    from medlite.models.ops.selective_scan import native_kernel as load

    kernel = load()
    if kernel is None:
        status = native.status()
        if status.startswith(("no C compiler", "switched off")):
            pytest.skip(f"medlite's C scan kernel is not available: {status}")
        pytest.fail(f"medlite's C scan kernel should work here but is not used: {status}")
    return kernel
