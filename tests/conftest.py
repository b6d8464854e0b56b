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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.stash[CALL_PASSED] = report.passed
    return report


CALL_PASSED = pytest.StashKey[bool]()


@pytest.fixture
def h(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The harness; a test that passes with daemons still running must also leave them quiet
    (see ``Harness.assert_quiet``), unless it is marked ``not_quiet`` with its reason."""
    harness = Harness(short_tmp)
    (short_tmp / "logs").mkdir()
    try:
        yield harness
        if (request.node.stash.get(CALL_PASSED, False) and harness.daemons()
                and request.node.get_closest_marker("not_quiet") is None):
            harness.assert_quiet()
    finally:
        stuck = harness.cleanup()
        for proc in harness.procs:  # shown by pytest only when the test failed
            print(f"----- {proc.name} {proc.args[2:4]}\n{proc.log()[-6000:]}")
    assert not stuck, f"processes that did not die at teardown: {stuck}"
