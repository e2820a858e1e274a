"""Session-wide test settings: W&B stays offline and writes under a temporary directory; property tests draw the
same examples on every run (profile ``explore``, ``--hypothesis-profile explore``, draws new ones)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")


@pytest.fixture(scope="session", autouse=True)
def _offline_wandb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test reaches the W&B servers or writes ``./wandb`` (tests may still override these per test)."""
    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            path = root / var.removeprefix("WANDB_").lower()
            path.mkdir()
            mp.setenv(var, str(path))
        yield
