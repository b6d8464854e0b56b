"""Fixtures that own every directory and process a test starts, and fail loudly on leaks."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Harness


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: ipc:// paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def h(short_tmp: Path) -> Iterator[Harness]:
    harness = Harness(short_tmp)
    (short_tmp / "logs").mkdir()
    try:
        yield harness
    finally:
        stuck = harness.cleanup()
        for proc in harness.procs:  # shown by pytest only when the test failed
            print(f"----- {proc.name} {proc.args[2:4]}\n{proc.log()[-6000:]}")
    assert not stuck, f"processes that did not die at teardown: {stuck}"
