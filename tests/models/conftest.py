"""Model tests run tiny batches: one intra-op thread is as fast and never thrashes a busy box."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
