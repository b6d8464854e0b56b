"""CurveZMQ: only authorised agents write, only they read, nothing in clear on the wire; the
control plane keeps admin commands to ipc:// or admin keys; secrets never show."""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
from harness import (
    Endpoints,
    Harness,
    Writer,
    append_lines,
    check_exactly_once,
    count_lines,
    free_port,
    make_lines,
    output_lines,
    wait_for,
)

from fleetlog import curve, wire


@dataclass
class Keys:
    private: Path
    agents: Path
    admins: Path

    def secret(self, name: str) -> str:
        return str(self.private / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.private / f"{name}.key")


@pytest.fixture
def keys(h: Harness) -> Keys:
    k = Keys(h.path("keys", "private"), h.path("keys", "agents"), h.path("keys", "admins"))
    for name in ("aggregator", "web-01", "stranger", "admin"):
        curve.generate(str(k.private), name)
    k.agents.mkdir()
    k.admins.mkdir()
    shutil.copy(k.public("web-01"), k.agents)
    shutil.copy(k.public("admin"), k.admins)
    return k


def secure_aggregator(h: Harness, keys: Keys) -> tuple[Endpoints, Endpoints]:
    """(tcp endpoints, same with the ipc:// control endpoint) of an aggregator with CURVE on."""
    tcp = h.endpoints(tcp=True)
    ipc_control = f"ipc://{h.root}/ctl.sock"
    h.aggregator(tcp, f"aggregator.control=[\"{tcp.control}\", \"{ipc_control}\"]",
                 f"aggregator.curve_secret_key={keys.secret('aggregator')}",
                 f"aggregator.authorized_keys_dir={keys.agents}",
                 f"aggregator.admin_keys_dir={keys.admins}")
    local = Endpoints(tcp.pull, tcp.xsub, tcp.xpub, ipc_control)
    wait_for(lambda: h.ctl(local, "ping").returncode == 0, what="aggregator up")
    return tcp, local


def agent_keys(keys: Keys, name: str = "web-01") -> list[str]:
    return [f"agent.curve_secret_key={keys.secret(name)}",
            f"agent.curve_server_key={keys.public('aggregator')}"]


def test_keygen_writes_safe_modes(h: Harness) -> None:
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "aggregator.ctl", "keygen", "node7", "--dir", str(h.path("k"))],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(h.path("k", "node7.key_secret")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(h.path("k", "node7.key")).st_mode) == 0o644
    again = subprocess.run([sys.executable, "-m", "aggregator.ctl", "keygen", "node7", "--dir",
                            str(h.path("k"))], capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr


@pytest.mark.parametrize("mode", ["push", "pub"])
def test_authorised_agent_works(h: Harness, keys: Keys, mode: str) -> None:
    tcp, _local = secure_aggregator(h, keys)
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 2000))
    h.agent(tcp, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "sec"}], *agent_keys(keys), mode=mode)
    wait_for(lambda: count_lines(h.path("out", "sec", "sec.log")) >= 2000, what="lines from the agent")
    check_exactly_once(output_lines(h.path("out"), "sec"), {"a": 2000})


def _batch(topic: str = "intruder") -> list[bytes]:
    return wire.encode_batch(wire.Batch(topic, "mallory", "s1", 0, "/x", "1:2:3", 0, 0, 6, ["hello"]))


def test_clients_without_curve_or_with_an_unknown_key_get_nothing_written(h: Harness, keys: Keys) -> None:
    tcp, local = secure_aggregator(h, keys)
    ctx = zmq.Context()
    plain = ctx.socket(zmq.PUSH)
    stranger = ctx.socket(zmq.PUSH)
    curve.as_client(stranger, curve.load_secret(keys.secret("stranger")),
                    curve.load_public(keys.public("aggregator")))
    try:
        for s in (plain, stranger):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, 100)
            s.connect(tcp.pull)
        # An agent process with an unknown key, too.
        append_lines(h.path("logs", "a.log"), make_lines("a", 0, 100))
        h.agent(tcp, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "intruder"}],
                *agent_keys(keys, "stranger"), name="mallory")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for s in (plain, stranger):
                try:
                    s.send_multipart(_batch())
                except zmq.Again:
                    pass
            time.sleep(0.05)
        status = h.status(local)
        assert status["totals"]["lines_written"] == 0
        assert not h.path("out", "intruder").exists()
        assert status["agents"] == []
    finally:
        plain.close()
        stranger.close()
        ctx.term()


class Relay:
    """A TCP relay that records what the client sends: the wire as an eavesdropper sees it."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream[len("tcp://"):].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.seen = bytearray()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the relay was closed
            try:
                up = socket.create_connection(self.upstream)
            except OSError:
                client.close()  # upstream not listening yet: the client reconnects
                continue
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.server.close()


@pytest.mark.parametrize("secure", [True, False], ids=["curve", "plain-control"])
def test_lines_are_not_in_clear_on_the_wire(h: Harness, keys: Keys, secure: bool) -> None:
    if secure:
        tcp, _local = secure_aggregator(h, keys)
        extra = agent_keys(keys)
    else:
        tcp = h.endpoints(tcp=True)
        h.aggregator(tcp)
        extra = []
    relay = Relay(tcp.pull)
    try:
        marker = "SECRET-CARD-NUMBER-4111111111111111"
        append_lines(h.path("logs", "a.log"), [f"a#{i:08d} {marker}" for i in range(50)])
        via_relay = Endpoints(relay.endpoint, tcp.xsub, tcp.xpub, tcp.control)
        h.agent(via_relay, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "sec"}], *extra)
        wait_for(lambda: count_lines(h.path("out", "sec", "sec.log")) >= 50, what="lines through the relay")
        assert len(relay.seen) > 50 * len(marker)
        assert (marker.encode() in relay.seen) is not secure
    finally:
        relay.close()


def test_admin_commands_need_ipc_or_an_admin_key(h: Harness, keys: Keys) -> None:
    tcp, local = secure_aggregator(h, keys)
    server = ["--server-key", keys.public("aggregator")]
    as_agent = h.ctl(tcp, "--curve-key", keys.secret("web-01"), *server, "status", "--json")
    assert as_agent.returncode == 0, as_agent.stderr
    refused = h.ctl(tcp, "--curve-key", keys.secret("web-01"), *server, "rotate")
    assert refused.returncode == 1 and "admin command" in refused.stderr
    assert h.ctl(tcp, "--curve-key", keys.secret("admin"), *server, "rotate").returncode == 0
    assert h.ctl(local, "rotate").returncode == 0
    no_key = h.ctl(tcp, "--timeout", "1", "status")
    assert no_key.returncode == 3
    unknown = h.ctl(tcp, "--timeout", "1", "--curve-key", keys.secret("stranger"), *server, "status")
    assert unknown.returncode == 3


def test_secrets_never_show(h: Harness, keys: Keys) -> None:
    tcp, local = secure_aggregator(h, keys)
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 10))
    agent = h.agent(tcp, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "sec"}], *agent_keys(keys))
    wait_for(lambda: count_lines(h.path("out", "sec", "sec.log")) >= 10, what="lines")
    secrets = [curve.load_secret(keys.secret(n)).secret.decode() for n in ("aggregator", "web-01")]
    status = orjson.dumps(h.status(local)).decode()
    logs = "".join(p.log() for p in h.procs) + agent.log()
    for secret in secrets:
        assert secret not in status and secret not in logs
        assert secret not in repr(curve.load_secret(keys.secret("web-01")))


def test_random_junk_on_the_data_ports_changes_nothing(h: Harness) -> None:
    ep = h.endpoints()
    agg = h.aggregator(ep)
    rng = random.Random(7)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(ep.pull)
    try:
        topics = [b"../x", b"a/b", b"..", b"", b"ok", b"\x00", b"t" * 129, b"good-topic"]
        for _ in range(500):
            topic = rng.choice(topics)
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
            if rng.random() < 0.5:
                doc = {"v": 1, "agent": rng.choice(["a", "", 5]), "stream": "s", "base": rng.randint(-2, 5),
                       "path": "../../etc/passwd", "file": "x", "seq": 0, "start": rng.randint(-1, 9),
                       "end": rng.randint(-1, 9), "lines": rng.choice([[], ["x"], [None], "x", [1.5]])}
                body = orjson.dumps(doc)
            push.send_multipart([topic, body])
        wait_for(lambda: h.status(ep)["totals"]["malformed_dropped"] >= 400, what="junk counted")
        assert agg.alive()
        for root, _dirs, files in os.walk(h.root):
            for name in files:
                path = Path(root, name)
                assert not path.is_relative_to(h.path("out")) or path.parts[len(h.path("out").parts)] in (
                    "good-topic", "ok"), path
        # Warnings are rate-limited: one per peer and reason, not one per message.
        assert agg.log().count("malformed message") < 20
    finally:
        push.close()
        ctx.term()


def test_sighup_reloads_the_authorised_keys(h: Harness, keys: Keys) -> None:
    """Authorising (or revoking) a key is a file in authorized_keys_dir and a reload."""
    import signal
    tcp, local = secure_aggregator(h, keys)
    server = ["--server-key", keys.public("aggregator")]
    assert h.ctl(tcp, "--timeout", "1", "--curve-key", keys.secret("stranger"), *server,
                 "status").returncode == 3
    shutil.copy(keys.public("stranger"), keys.agents)
    agg = h.procs[0]
    agg.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: h.ctl(tcp, "--timeout", "1", "--curve-key", keys.secret("stranger"), *server,
                           "status").returncode == 0, what="the new key admitted after SIGHUP")
    os.unlink(keys.agents / "stranger.key")
    assert h.ctl(local, "reload").returncode == 0
    assert h.ctl(tcp, "--timeout", "1", "--curve-key", keys.secret("stranger"), *server,
                 "status").returncode == 3


# --- roll-out, revocation and refusals (issue 13) --------------------------------------------------


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    """Writers a test starts, stopped at teardown even when the test fails."""
    started: list[Writer] = []
    yield started
    for writer in started:
        writer.stop()


def authorise(h: Harness, keys: Keys, local: Endpoints, *names: str) -> None:
    """Copy agents' public keys into authorized_keys_dir and reload the aggregator."""
    for name in names:
        shutil.copy(keys.public(name), keys.agents)
    r = h.ctl(local, "reload")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mode", ["push", "pub"])
def test_agent_refused_then_authorised_ships_without_restart(h: Harness, keys: Keys, mode: str) -> None:
    tcp, local = secure_aggregator(h, keys)
    curve.generate(str(keys.private), "web-02")
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 500))
    agent = h.agent(tcp, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "sec"}],
                    *agent_keys(keys, "web-02"), name="web-02", mode=mode)
    public = curve.load_secret(keys.secret("web-02")).public.decode()
    wait_for(lambda: "refuses this agent's CURVE key" in agent.log(), what="the agent saying it is refused")
    assert public in agent.log()
    status = wait_for(lambda: h.agent_status("web-02"), what="agent status")
    assert any("refuses this agent's CURVE key" in p for p in status["problems"]), status
    # Refused again and again while it waits, but said once (per socket), and never a traceback.
    wait_for(lambda: h.status(local)["refusals"]["total"] >= 4, what="the agent retrying its handshake")
    assert agent.log().count("refuses this agent's CURVE key") <= 2
    assert "Traceback" not in agent.log() and "never retrieved" not in agent.log()
    authorise(h, keys, local, "web-02")
    wait_for(lambda: count_lines(h.path("out", "sec", "sec.log")) >= 500, timeout=30,
             what="lines once the key is authorised")
    check_exactly_once(output_lines(h.path("out"), "sec"), {"a": 500})
    assert wait_for(lambda: (s := h.agent_status("web-02")) and not s["problems"] and s, what="no problem")
    assert agent.alive()
    h.assert_quiet(tcp)


def test_revoked_agent_is_cut_off_within_seconds(h: Harness, keys: Keys, writers: list[Writer]) -> None:
    """ZAP runs only at the handshake: removing a key and reloading must still stop a connected
    agent (its connections are cut and its handshakes refused), and authorising it again lets it
    ship the rest, exactly once."""
    tcp, local = secure_aggregator(h, keys)
    log_path = h.path("logs", "a.log")
    append_lines(log_path, make_lines("a", 0, 300))
    agent = h.agent(tcp, [{"paths": [str(log_path)], "topic": "sec"}], *agent_keys(keys))
    # Another agent, authorised throughout, ships all along: the cut costs it nothing.
    curve.generate(str(keys.private), "web-03")
    shutil.copy(keys.public("web-03"), keys.agents)
    assert h.ctl(local, "reload").returncode == 0
    other = Writer({"b": h.path("logs", "b.log")}, lines_per_tick=2, tick_s=0.01).start()
    writers.append(other)
    h.agent(tcp, [{"paths": [str(h.path("logs", "b.log"))], "topic": "other"}], *agent_keys(keys, "web-03"),
            name="web-03")
    out = h.path("out", "sec", "sec.log")
    wait_for(lambda: count_lines(out) >= 300, what="lines before the revocation")
    wait_for(lambda: count_lines(h.path("out", "other", "other.log")) > 50, what="the other agent shipping")
    os.unlink(keys.agents / "web-01.key")
    assert h.ctl(local, "reload").returncode == 0
    revoked_at = time.monotonic()
    wait_for(lambda: any("CURVE key" in p for p in (h.agent_status() or {}).get("problems", [])),
             timeout=10, what="the agent saying it is refused")
    assert time.monotonic() - revoked_at < 10
    public = curve.load_secret(keys.secret("web-01")).public.decode()
    refused = h.status(local)["refusals"]
    assert any(p["key"] == public and p["address"] == "127.0.0.1" and p["reason"] == "revoked_key"
               for p in refused["peers"]), refused
    append_lines(log_path, make_lines("a", 300, 200))
    before = count_lines(out)
    written = other.stop()
    wait_for(lambda: (s := h.agent_status("web-03")) and s["lag_bytes"] == 0 and s["inflight_bytes"] == 0
             and not s["problems"], what="the other agent acknowledged after the cut")
    check_exactly_once(output_lines(h.path("out"), "other"), written)
    links = h.agent_status("web-03")["links"]  # type: ignore[index]
    assert links["data"]["handshakes"] >= 2 and links["control"]["handshakes"] >= 2, links  # cut, back
    h.assert_quiet(local)  # a window in which the revoked agent retries quietly...
    assert count_lines(out) == before  # ...and nothing of its is written
    authorise(h, keys, local, "web-01")
    wait_for(lambda: count_lines(out) >= 500, timeout=30, what="the rest once authorised again")
    check_exactly_once(output_lines(h.path("out"), "sec"), {"a": 500})
    assert "Traceback" not in agent.log()
    h.assert_quiet(local)


def test_refusals_counted_with_peer_and_key(h: Harness, keys: Keys) -> None:
    """Each kind of refused client is counted in status and metrics with its address (and key
    when it has one), logged once, and the client is told where it can be."""
    from test_ops import scrape

    tcp = h.endpoints(tcp=True)
    port = free_port()
    ipc_control = f"ipc://{h.root}/ctl.sock"
    agg = h.aggregator(tcp, f"aggregator.control=[\"{tcp.control}\", \"{ipc_control}\"]",
                       f"aggregator.curve_secret_key={keys.secret('aggregator')}",
                       f"aggregator.authorized_keys_dir={keys.agents}",
                       f"aggregator.admin_keys_dir={keys.admins}",
                       f"aggregator.metrics_listen=127.0.0.1:{port}")
    local = Endpoints(tcp.pull, tcp.xsub, tcp.xpub, ipc_control)
    wait_for(lambda: h.ctl(local, "ping").returncode == 0, what="aggregator up")
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 10))
    sources = [{"paths": [f"{h.path('logs')}/*.log"], "topic": "sec"}]
    # A stranger's key; an authorised agent holding a stale server key; a plain client.
    stranger = h.agent(tcp, sources, *agent_keys(keys, "stranger"), name="stranger")
    stale = h.agent(tcp, sources, f"agent.curve_secret_key={keys.secret('web-01')}",
                    f"agent.curve_server_key={keys.public('stranger')}", name="stale")
    plain = h.agent(tcp, sources, name="plain")
    stranger_key = curve.load_secret(keys.secret("stranger")).public.decode()

    def refusals() -> dict[tuple[str, str, str], int]:
        peers = h.status(local)["refusals"]["peers"]
        return {(p["address"], p["key"], p["reason"]): p["count"] for p in peers}

    wait_for(lambda: {("127.0.0.1", stranger_key, "unknown_key"), ("127.0.0.1", "", "no_curve"),
                      ("127.0.0.1", "", "bad_server_key")} <= set(refusals()), timeout=30,
             what="each refusal counted with its peer")
    no_curve = 'fleetlog_aggregator_refusals_total{reason="no_curve"}'
    m = wait_for(lambda: (x := scrape(port)).get(no_curve) and x, what="refusals in the metrics")
    assert m[f'fleetlog_aggregator_refused_peer_total{{address="127.0.0.1",key="{stranger_key}",'
             'reason="unknown_key"}'] >= 1
    text = agg.log()
    assert f"from 127.0.0.1 with key {stranger_key}" in text
    assert "without CURVE keys" in text and "curve_server_key is not this aggregator's" in text
    assert "refuses this agent's CURVE key" in stranger.log()
    wait_for(lambda: "stale server key" in stale.log(), what="the stale server key named")
    wait_for(lambda: "requires CURVE" in plain.log(), what="the plain agent told CURVE is required")
    # aggregatorctl says why too, rather than "is it running?".
    server = ["--server-key", keys.public("aggregator")]
    r = h.ctl(tcp, "--timeout", "2", "--curve-key", keys.secret("stranger"), *server, "status")
    assert r.returncode == 3 and "refused this client's CURVE key" in r.stderr, r.stderr
    r = h.ctl(tcp, "--timeout", "2", "status")
    assert r.returncode == 3 and "requires CURVE" in r.stderr, r.stderr
    r = h.ctl(tcp, "--timeout", "2", "--curve-key", keys.secret("web-01"), "--server-key",
              keys.public("stranger"), "status")
    assert r.returncode == 3 and "--server-key" in r.stderr, r.stderr
    h.assert_quiet(local)
    # Retrying, but each logged once.
    for proc, phrase in ((stranger, "refuses this agent's CURVE key"), (stale, "stale server key"),
                         (plain, "requires CURVE")):
        assert proc.log().count(phrase) <= 2, proc.log()
    assert agg.log().count(f"with key {stranger_key}") == 1


def test_curve_rollout_in_ansible_order_ends_shipping(h: Harness, keys: Keys, writers: list[Writer]) -> None:
    """A first `fleetlog_curve: true` run as the roles did it: the aggregator restarted with CURVE
    (no agent key known yet), then each agent restarted with its new key before the aggregator
    reloads the key directory. Every agent ships in the end, without another restart, every line
    exactly once."""
    import signal

    tcp = h.endpoints(tcp=True)
    ipc_control = f"ipc://{h.root}/ctl.sock"
    local = Endpoints(tcp.pull, tcp.xsub, tcp.xpub, ipc_control)
    control = f"aggregator.control=[\"{tcp.control}\", \"{ipc_control}\"]"
    names = ["web-02", "web-03", "web-04"]
    for name in names:
        curve.generate(str(keys.private), name)
    for f in keys.agents.iterdir():
        f.unlink()
    paths = {name: h.path("logs", name, "app.log") for name in names}
    for p in paths.values():
        p.parent.mkdir()
    writer = Writer(dict(paths), lines_per_tick=2, tick_s=0.02).start()
    writers.append(writer)

    def start_agents(with_keys: bool = False) -> list[Any]:
        return [h.agent(tcp, [{"paths": [str(paths[n])], "topic": "app"}],
                        *(agent_keys(keys, n) if with_keys else []), name=n) for n in names]

    agg = h.aggregator(tcp, control)
    agents = start_agents()
    wait_for(lambda: len(output_lines(h.path("out"), "app")) > 100, what="plain shipping")
    # The aggregator play: CURVE on, a restart, no agent key yet.
    assert agg.stop(signal.SIGTERM) == 0
    agg = h.aggregator(tcp, control, f"aggregator.curve_secret_key={keys.secret('aggregator')}",
                       f"aggregator.authorized_keys_dir={keys.agents}",
                       f"aggregator.admin_keys_dir={keys.admins}")
    wait_for(lambda: h.ctl(local, "ping").returncode == 0, what="aggregator up with CURVE")
    # The agent play, as the handlers used to run: each agent restarted with its key first...
    for a in agents:
        assert a.stop(signal.SIGTERM) == 0
    agents = start_agents(with_keys=True)
    wait_for(lambda: all("refuses this agent's CURVE key" in a.log() for a in agents), what="agents refused")
    # ...then the aggregator reloaded (systemctl reload: SIGHUP) with their keys.
    for n in names:
        shutil.copy(keys.public(n), keys.agents)
    agg.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    counts = writer.stop()
    wait_for(lambda: all((s := h.agent_status(n)) and s["lag_bytes"] == 0 and s["inflight_bytes"] == 0
                         and not s["problems"] for n in names), timeout=40,
             what="every agent shipping and acknowledged, without a restart")
    check_exactly_once(output_lines(h.path("out"), "app"), counts)
    assert all(a.alive() for a in agents)
    h.assert_quiet(local)
    # And both sides stop cleanly, monitors, ZAP handler and all.
    for a in agents:
        assert a.stop(signal.SIGTERM) == 0, a.log()[-3000:]
    assert agg.stop(signal.SIGTERM) == 0, agg.log()[-3000:]
    for proc in (agg, *agents):
        assert "Traceback" not in proc.log() and "destroyed but it is pending" not in proc.log(), proc.log()


def test_tail_without_keys_says_the_stream_needs_curve(h: Harness, keys: Keys) -> None:
    _tcp, local = secure_aggregator(h, keys)
    r = h.ctl(local, "tail", "sec")  # the ipc control socket answers; XPUB is CURVE only
    assert r.returncode == 2 and "CURVE only" in r.stderr, r.stderr
