"""Operating the aggregator: aggregatorctl rotate/status/top, SIGHUP reload, Prometheus metrics,
systemd notify. Real processes, sockets and files; every wait has a deadline."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import zmq
from harness import (
    PY,
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
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from aggregator.ctl import Client


def rotated(h: Harness, topic: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(h.path("out", topic)) if n != f"{topic}.log")
    except FileNotFoundError:
        return []


def all_compressed(h: Harness, topic: str) -> bool:
    names = rotated(h, topic)
    return bool(names) and all(n.endswith(".log.gz") for n in names)


def test_ctl_rotate_a_topic_then_all_then_after_a_restart(h: Harness) -> None:
    ep = h.endpoints()
    logs = h.path("logs")
    for name in ("web", "db"):
        (logs / name).mkdir()
        append_lines(logs / name / "a.log", make_lines(name, 0, 500))
    agg = h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{logs}/web/*.log"], "topic": "web"},
                 {"paths": [f"{logs}/db/*.log"], "topic": "db"}])
    for name in ("web", "db"):
        wait_for(lambda n=name: count_lines(h.path("out", n, f"{n}.log")) == 500, what=f"{name} lines")

    r = h.ctl(ep, "rotate", "web")
    assert r.returncode == 0, r.stderr
    # The name the file ends up with: compressed in the background, as .log.gz.
    assert r.stdout.startswith("rotated to web.") and r.stdout.strip().endswith(".log.gz (compressing)")
    name = r.stdout.split()[2]
    wait_for(lambda: all_compressed(h, "web"), what="web's rotated file compressed")
    assert rotated(h, "web") == [name]
    assert count_lines(h.path("out", "web", "web.log")) == 0
    assert rotated(h, "db") == []

    for name in ("web", "db"):
        append_lines(logs / name / "a.log", make_lines(name, 500, 300))
    wait_for(lambda: count_lines(h.path("out", "db", "db.log")) == 800
             and count_lines(h.path("out", "web", "web.log")) == 300, what="more lines")
    r = h.ctl(ep, "rotate")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("rotated to") == 2
    wait_for(lambda: all_compressed(h, "db") and len(rotated(h, "web")) == 2 and all_compressed(h, "web"),
             what="both topics rotated and compressed")
    r = h.ctl(ep, "rotate")
    assert r.returncode == 0 and "nothing to rotate" in r.stdout

    r = h.ctl(ep, "rotate", "nosuch")
    assert r.returncode == 1 and "no such topic" in r.stderr
    r = h.ctl(ep, "rotate", "../etc")
    assert r.returncode == 1 and "not a topic name" in r.stderr

    # After a restart, a topic nothing was written to yet still rotates on request.
    append_lines(logs / "db" / "a.log", make_lines("db", 800, 100))
    wait_for(lambda: count_lines(h.path("out", "db", "db.log")) == 100, what="db lines")
    assert agg.stop() == 0
    agg = h.aggregator(ep)
    r = wait_for(lambda: (x := h.ctl(ep, "rotate", "db")).returncode == 0 and x, what="rotate after restart")
    assert r.stdout.count("rotated to db.") == 1
    wait_for(lambda: len(rotated(h, "db")) == 2 and all_compressed(h, "db"), what="db rotated again")
    check_exactly_once(output_lines(h.path("out"), "web", include_rotated=True), {"web": 800})
    check_exactly_once(output_lines(h.path("out"), "db", include_rotated=True), {"db": 900})
    assert "Traceback" not in agg.log()


def test_size_rotation_under_load_compresses_in_the_background(h: Harness) -> None:
    ep = h.endpoints()
    agg = h.aggregator(ep, "aggregator.rotate_max_bytes=65536")
    h.path("logs").mkdir(exist_ok=True)
    for i in range(3):
        h.path("logs", f"w{i}.log").touch()
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    # The agent connected first: on a loaded machine it could start after the writer was done
    # and ship everything in one commit (one rollover).
    wait_for(lambda: (a := h.status(ep)["agents"]) and a[0]["connected"], what="the agent connected")
    # Written over about 3 s, so that many group commits (each may roll over) happen meanwhile.
    writer = Writer({f"w{i}": h.path("logs", f"w{i}.log") for i in range(3)}, lines_per_tick=40,
                    tick_s=0.02, limit=6000).start()
    # The control plane stays responsive while files roll and compress.
    h.status(ep)  # bound (a Client says at once when nothing listens yet)
    client = Client(ep.control, timeout_s=10)
    slowest = 0.0
    try:
        while writer._thread.is_alive():
            started = time.monotonic()
            client.call("status")
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.02)
    finally:
        client.close()
    counts = writer.stop()
    wait_for(lambda: h.status(ep)["totals"]["lines_written"] >= sum(counts.values()), what="every line")
    # Read the files once they stand still; SIGTERM waits for running compressions.
    assert agg.stop() == 0
    assert all_compressed(h, "app"), rotated(h, "app")
    names = rotated(h, "app")
    assert len(names) >= 3, names
    # Every rotated file reached the size limit (it rolls over at the first commit past it).
    for name in names:
        size = len(gzip.decompress(h.path("out", "app", name).read_bytes()))
        assert size >= 65536, (name, size)
    check_exactly_once(output_lines(h.path("out"), "app", include_rotated=True), counts)
    assert slowest < 2.0, f"status took {slowest:.2f}s during rotations"


# ---- SIGHUP reload --------------------------------------------------------------------------


def write_config(path: Path, h: Harness, ep: Endpoints, extra: str = "", tables: str = "",
                 pull: str | None = None) -> None:
    path.write_text(f"""
[aggregator]
output_dir = "{h.path('out')}"
state_dir = "{h.path('agg')}"
pull = "{pull or ep.pull}"
xsub = "{ep.xsub}"
xpub = "{ep.xpub}"
control = "{ep.control}"
log_level = "debug"
{extra}
{tables}
""")


def test_sighup_reloads_the_config_and_keeps_the_running_one_when_bad(h: Harness) -> None:
    ep = h.endpoints()
    conf = h.path("aggregator.toml")
    write_config(conf, h, ep)
    agg = h._proc("aggregator", [PY, "-m", "aggregator", "--config", str(conf)]).start()
    log = h.path("logs", "j.log")
    out = h.path("out", "j", "j.log")
    h.agent(ep, [{"paths": [str(log)], "topic": "j"}], name="web-07")
    append_lines(log, make_lines("j", 0, 10))
    wait_for(lambda: count_lines(out) == 10, what="raw lines")

    json_j = '[aggregator.topics.j]\nformat = "json"\n'
    write_config(conf, h, ep, tables=json_j)
    agg.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: "configuration reloaded" in agg.log(), what="reload logged")
    append_lines(log, make_lines("j", 10, 10))
    wait_for(lambda: count_lines(out) == 20, what="lines after the reload")
    lines = out.read_text().splitlines()
    assert all(line.startswith("j#") for line in lines[:10])
    docs = [orjson.loads(line) for line in lines[10:]]
    assert [d["line"] for d in docs] == make_lines("j", 10, 10)
    assert {d["agent"] for d in docs} == {"web-07"} and {d["path"] for d in docs} == {str(log)}

    # A broken config: reported, the daemon goes on with the running one.
    write_config(conf, h, ep, 'rotate_max_bytes = "big"\nno_such_key = 1', tables=json_j)
    agg.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: "reload refused" in agg.log(), what="refusal logged")
    refusal = next(line for line in agg.log().splitlines() if "reload refused" in line)
    assert "aggregator.rotate_max_bytes" in refusal and "aggregator.no_such_key" in refusal
    assert refusal.startswith("WARNING") or " WARNING " in refusal
    append_lines(log, make_lines("j", 20, 10))
    wait_for(lambda: count_lines(out) == 30, what="lines after the refused reload")
    assert orjson.loads(out.read_text().splitlines()[-1])["line"] == make_lines("j", 29, 1)[0]
    assert agg.alive() and h.status(ep)["totals"]["lines_written"] == 30

    # The same through aggregatorctl: refused with the problems, then accepted once fixed.
    r = h.ctl(ep, "reload")
    assert r.returncode == 1 and "rotate_max_bytes" in r.stderr
    write_config(conf, h, ep, "rotate_max_bytes = 1000000", pull=f"ipc://{h.root}/elsewhere.sock")
    r = h.ctl(ep, "reload")
    assert r.returncode == 0, r.stderr
    assert "restart needed for pull" in r.stdout
    append_lines(log, make_lines("j", 30, 10))
    wait_for(lambda: count_lines(out) == 40, what="raw lines again, same pull endpoint")
    assert out.read_text().splitlines()[-1] == make_lines("j", 39, 1)[0]
    assert agg.stop() == 0


# ---- status and top -------------------------------------------------------------------------


def test_status_table_and_json(h: Harness) -> None:
    ep = h.endpoints()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 700))
    h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "st"}], name="db-02")
    wait_for(lambda: count_lines(h.path("out", "st", "st.log")) == 700, what="lines")
    s = wait_for(lambda: (x := h.status(ep))["agents"] and x["agents"][0]["address"] and x, what="agent")
    agent = s["agents"][0]
    assert agent["name"] == "db-02" and agent["mode"] == "push" and agent["connected"] is True
    assert agent["lines"] == 700 and agent["bytes"] == h.path("out", "st", "st.log").stat().st_size
    assert {"last_seen_s", "lines_per_s", "lag_bytes", "files"} <= set(agent)
    topic = s["topics"][0]
    assert topic["name"] == "st" and topic["lines"] == 700 and topic["file_bytes"] == topic["bytes"]
    assert {"lines_written", "duplicates_dropped", "malformed_dropped", "resyncs"} <= set(s["totals"])
    assert s["disk"]["output_free_bytes"] > 0

    r = h.ctl(ep, "status")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for word in ("disk free", "agents (1)", "address", "mode", "connected", "last seen", "lines/s", "lag",
                 "db-02", "push", "topics (1)", "active file", "700 lines written",
                 "0 duplicates dropped", "0 malformed dropped", "0 resyncs"):
        assert word in text, (word, text)


def test_top_redraws_until_iterations(h: Harness) -> None:
    ep = h.endpoints()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 300))
    h.aggregator(ep)
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "toptopic"}], name="top-agent")
    wait_for(lambda: count_lines(h.path("out", "toptopic", "toptopic.log")) == 300, what="lines")
    wait_for(lambda: h.status(ep)["agents"], what="agent known")
    started = time.monotonic()
    r = h.ctl(ep, "top", "--interval", "0.2", "--iterations", "3")
    assert r.returncode == 0, r.stderr
    assert 0.35 < time.monotonic() - started < 10
    screens = [s for s in r.stdout.split("\n\n\n") if s.strip()]
    assert r.stdout.count("fleetlog top") == 3, r.stdout
    for word in ("TOPIC", "LINES/S", "BYTES/S", "toptopic", "AGENT", "LAG", "top-agent", "written 300"):
        assert word in r.stdout, word
    assert screens


def test_top_says_so_when_nothing_answers(h: Harness) -> None:
    r = subprocess.run([sys.executable, "-m", "aggregator.ctl", "--control", f"ipc://{h.root}/none.sock",
                        "--timeout", "1", "top", "--iterations", "2"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 3 and "is it running?" in r.stderr and "Traceback" not in r.stderr


# ---- Prometheus metrics ---------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """``name{label="v",...}`` -> value, for every sample of every family."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_aggregator_metrics(h: Harness) -> None:
    ep = h.endpoints()
    port = free_port()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 1000))
    h.aggregator(ep, f"aggregator.metrics_listen=127.0.0.1:{port}")
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "m"}], name="node-m")
    wait_for(lambda: count_lines(h.path("out", "m", "m.log")) == 1000, what="lines")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        push.connect(ep.pull)
        push.send_multipart([b"bad topic!", b"{}"])
        push.send_multipart([b"ok", b"not json"])
        wait_for(lambda: h.status(ep)["totals"]["malformed_dropped"] == 2, what="malformed counted")
    finally:
        push.close(linger=0)
        ctx.term()
    size = h.path("out", "m", "m.log").stat().st_size
    # Settled: the lines committed (lines reach the file before their group commit) and the
    # agent's heartbeat reporting no lag.
    m = wait_for(lambda: (x := scrape(port)).get('fleetlog_aggregator_agent_lag_bytes{agent="node-m"}') == 0
                 and x.get('fleetlog_aggregator_agent_connected{agent="node-m"}') == 1
                 and x.get("fleetlog_aggregator_pending_bytes") == 0
                 and x.get("fleetlog_aggregator_commit_seconds_count", 0) >= 1 and x,
                 what="metrics with the lines committed and the agent's heartbeat")
    assert m['fleetlog_aggregator_lines_total{topic="m"}'] == 1000
    assert m['fleetlog_aggregator_bytes_total{topic="m"}'] == size
    assert m['fleetlog_aggregator_agent_lines_total{agent="node-m"}'] == 1000
    assert m['fleetlog_aggregator_agent_bytes_total{agent="node-m"}'] == size
    assert m['fleetlog_aggregator_agent_connected{agent="node-m"}'] == 1
    assert m['fleetlog_aggregator_active_file_bytes{topic="m"}'] == size
    assert m['fleetlog_aggregator_dropped_lines_total{reason="duplicate"}'] == 0
    assert sum(v for k, v in m.items() if k.startswith("fleetlog_aggregator_dropped_messages_total{")) == 2
    commits = m["fleetlog_aggregator_commit_seconds_count"]
    assert commits >= 1 and m['fleetlog_aggregator_commit_seconds_bucket{le="+Inf"}'] == commits
    assert m["fleetlog_aggregator_pending_bytes"] == 0
    assert m["fleetlog_aggregator_window_share_bytes"] == 64 * 1024 * 1024  # the whole budget: none catch up
    assert m['fleetlog_aggregator_agent_window_bytes{agent="node-m"}'] == 1024 * 1024  # not catching up
    assert m['fleetlog_aggregator_agent_lag_seconds{agent="node-m"}'] == 0
    assert m["fleetlog_aggregator_journal_bytes"] > 0
    assert m["fleetlog_aggregator_output_used_bytes"] > 0
    assert m["fleetlog_aggregator_rotations_total"] == 0
    assert 'fleetlog_aggregator_info{instance="' in "\n".join(m)
    assert m["fleetlog_aggregator_agents_catching_up"] == 0
    assert m["fleetlog_aggregator_output_free_bytes"] > 0
    assert m["fleetlog_aggregator_output_writable"] == 1
    assert m["process_resident_memory_bytes"] > 0
    assert "python_gc_objects_collected_total" not in str(m)  # a private registry, not the global one


@pytest.mark.skipif("metrics_listen" not in AgentConfig.__dataclass_fields__,
                    reason="agent.metrics_listen is not a config key yet")
def test_agent_metrics(h: Harness) -> None:
    ep = h.endpoints()
    port = free_port()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 500))
    agent = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "am"}],
                    f"agent.metrics_listen=127.0.0.1:{port}")
    # No aggregator yet: the lines wait in the file (lag), nothing is acknowledged.
    m = wait_for(lambda: (x := _try_scrape(port)) and x.get('fleetlog_agent_lag_bytes{topic="am"}') and x,
                 what="agent metrics")
    size = h.path("logs", "a.log").stat().st_size
    assert m['fleetlog_agent_lag_bytes{topic="am"}'] == size
    assert m['fleetlog_agent_files{topic="am"}'] == 1
    assert m["fleetlog_agent_connected"] == 0
    assert m["fleetlog_agent_window_bytes"] == 1024 * 1024  # the least, until the aggregator says
    h.aggregator(ep)
    m = wait_for(lambda: (x := scrape(port))['fleetlog_agent_lag_bytes{topic="am"}'] == 0 and x,
                 what="lag gone once acknowledged")
    assert m["fleetlog_agent_lines_shipped_total"] >= 500
    assert m["fleetlog_agent_unacked_bytes"] == 0
    assert m["fleetlog_agent_window_bytes"] == 1024 * 1024  # not catching up: the least
    assert m["fleetlog_agent_connected"] == 1
    assert agent.stop() == 0


def _try_scrape(port: int) -> dict[str, float] | None:
    try:
        return scrape(port)
    except OSError:
        return None


# ---- systemd notify -------------------------------------------------------------------------


class NotifySocket:
    """What systemd listens on for sd_notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait(self, line: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while sum(line in m.splitlines() for m in self.messages) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} (x{count}) within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("daemon", ["aggregator", "agent"])
def test_systemd_ready_watchdog_stopping(h: Harness, daemon: str) -> None:
    ep = h.endpoints()
    notify = NotifySocket(h.path("notify.sock"))
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    try:
        if daemon == "aggregator":
            proc = h.aggregator(ep, env=env)
        else:
            proc = h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "n"}], env=env)
        notify.wait("READY=1")
        # READY=1 means bound: the control socket answers right away, no retrying.
        if daemon == "aggregator":
            r = h.ctl(ep, "--timeout", "2", "ping")
        else:
            r = subprocess.run([PY, "-m", "agent", "status", "--timeout", "2",
                                "--set", f"agent.state_dir={h.path('st-node1')}"],
                               capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        ready = next(m for m in notify.messages if "READY=1" in m.splitlines())
        assert any(line.startswith("STATUS=") for line in ready.splitlines())
        notify.wait("WATCHDOG=1", count=4, timeout=10)  # every 0.1s (half of WATCHDOG_USEC)
        assert proc.stop(signal.SIGTERM) == 0
        notify.wait("STOPPING=1", timeout=5)
    finally:
        notify.close()
