"""What crosses the wire between agent and aggregator, when the wire or a batch misbehaves: a link
that dies without FIN or RST, a batch that would encode larger than the aggregator takes, a batch
lost while the agent's other files are acknowledged all along."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from harness import Harness, Writer, append_lines, check_exactly_once, free_port, make_lines, wait_for


def test_batch_of_control_characters_fits_the_aggregators_limit(h: Harness) -> None:
    """orjson writes a control character as six bytes: a 1 MiB read of them would be a 6 MiB
    message, which an aggregator taking 1 MiB drops with the connection. The agent reads less."""
    ep = h.endpoints()
    h.aggregator(ep, "aggregator.max_message_bytes=1048576")
    log = h.path("logs", "ctl.log")
    junk = "\x01" * 500
    with open(log, "w") as fh:
        for n in range(4000):  # 2 MiB of control characters
            fh.write(f"c#{n:08d} {junk}\n")
    h.agent(ep, [{"paths": [str(log)], "topic": "app"}], "agent.batch_max_bytes=1048576")
    wait_for(lambda: h.all_acknowledged(), timeout=30, what="every line acknowledged")
    check_exactly_once(h.lines(), {"c": 4000})
    s = h.agent_status()
    assert s is not None and s["oversized_batches"] == 0
    assert h.status(ep)["totals"]["malformed_dropped"] == 0


def test_a_lost_batch_is_resent_while_other_files_are_busy(h: Harness) -> None:
    """The ack timeout is per stream: a batch of quiet.log lost in the void (published before any
    aggregator listened) goes again although busy.log is acknowledged all the time."""
    ep = h.endpoints()
    append_lines(h.path("logs", "quiet.log"), make_lines("q", 0, 10))
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}], mode="pub")
    wait_for(lambda: (s := h.agent_status()) is not None and s["inflight_bytes"] > 0,
             what="quiet.log shipped into the void")
    h.aggregator(ep)
    writer = Writer({"b": h.path("logs", "busy.log")}, lines_per_tick=2, tick_s=0.02).start()
    wait_for(lambda: len(h.lines()) > 10 and any(x.startswith("q#") for x in h.lines()),
             timeout=30, what="quiet.log's lines resent while busy.log keeps the agent acknowledged")
    counts = writer.stop()
    wait_for(lambda: h.all_acknowledged(), what="every line acknowledged")
    check_exactly_once(h.lines(), {"q": 10, **counts})


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own, with its loopback up."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs root, ip and tc (iproute2) for a private network namespace")
    name = f"fl-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def drop_packets(ns: str, on: bool) -> None:
    """Drop every packet on the namespace's loopback, silently (no FIN, no RST): a token bucket
    of one byte lets nothing through. (netem is not in every kernel; tbf is.)"""
    cmd = ["ip", "netns", "exec", ns, "tc", "qdisc"]
    if on:
        subprocess.run([*cmd, "add", "dev", "lo", "root", "tbf", "rate", "1kbit", "burst", "1",
                        "latency", "1ms"], check=True)
    else:
        subprocess.run([*cmd, "del", "dev", "lo", "root"], check=True)


@pytest.mark.parametrize("mode", ["push", "pub"])
def test_dead_link_is_noticed_and_shipping_resumes_after_healing(h: Harness, netns: str, mode: str) -> None:
    h.prefix = ["ip", "netns", "exec", netns]
    ep = h.endpoints(tcp=True)  # ports are free in the namespace: it has nothing else
    h.aggregator(ep)
    writer = Writer({"w": h.path("logs", "w.log")}, lines_per_tick=2, tick_s=0.02).start()
    h.agent(ep, [{"paths": [str(h.path("logs", "w.log"))], "topic": "app"}], mode=mode)
    wait_for(lambda: len(h.lines()) > 50, what="lines flowing")
    # The first batch can land before the first hello is answered (on a loaded machine): the
    # link is cut only once the agent has heard from the aggregator, or it has no silence to see.
    wait_for(lambda: (s := h.agent_status()) is not None and s["aggregator_last_reply_s"] is not None,
             what="the agent hearing from the aggregator")
    drop_packets(netns, True)
    try:
        # The agent notices: its status says the aggregator has been silent for a while.
        wait_for(lambda: (s := h.agent_status()) is not None and (s["aggregator_last_reply_s"] or 0) > 4,
                 timeout=20, what="the agent noticing the dead link")
        before = len(h.lines())
    finally:
        drop_packets(netns, False)
    # Shipping resumes within seconds of healing (TCP's back-off alone took 24 s).
    wait_for(lambda: len(h.lines()) > before + 20, timeout=8, what="shipping resumed after healing")
    counts = writer.stop()
    wait_for(lambda: h.all_acknowledged(), what="every line acknowledged")
    h.assert_quiet(ep)
    check_exactly_once(h.lines(), counts)


def test_a_data_endpoint_nothing_listens_on_is_said_and_shipping_starts_once_it_does(h: Harness) -> None:
    """`data` names a port nothing listens on while the control endpoint answers (a typo, or the
    aggregator's pull moved): the agent says so once at WARNING and in its status (it said
    nothing, and nothing shipped); once the endpoint is right (here: the aggregator restarted on
    it), shipping starts and the problem is gone, every line once."""
    ep = h.endpoints(tcp=True)
    # The aggregator's pull elsewhere: the port the agent's data names is free.
    agg = h.aggregator(ep, f"aggregator.pull=tcp://127.0.0.1:{free_port()}")
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 100))
    agent = h.agent(ep, [{"paths": [str(h.path("logs", "a.log"))], "topic": "app"}])
    phrase = f"nothing accepts the data connection at {ep.pull}"
    wait_for(lambda: phrase in agent.log(), timeout=20, what="the agent saying nothing accepts its data")
    s = h.agent_status()
    assert s is not None and any(phrase in p for p in s["problems"]), s["problems"]
    assert "is `data`" in agent.log() and "WARNING" in agent.log()
    h.assert_quiet(ep)
    assert agent.log().count(phrase) == 1
    agg.stop()
    h.aggregator(ep)
    wait_for(lambda: h.all_acknowledged(), timeout=30, what="every line acknowledged")
    check_exactly_once(h.lines(), {"a": 100})
    s = h.agent_status()
    assert s is not None and not any(phrase in p for p in s["problems"]), s["problems"]
    assert "data connection to" in agent.log() and "works again" in agent.log()
