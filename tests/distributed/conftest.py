"""One spawn per world size for the whole package: both losses run in the same process group."""

from __future__ import annotations

from typing import Any

import pytest

from tests.distributed._harness import run_ranks
from tests.distributed._workers import both_worker

WORLD_SIZES = (2, 3, 4)


@pytest.fixture(scope="package", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    """(world size, what each rank returned from :func:`both_worker`)."""
    return request.param, run_ranks(both_worker, request.param)
