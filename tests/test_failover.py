"""Agents with several aggregators: ranked by a rendezvous hash, sticking to one, failing over in
rank order (a kill -9, a SIGTERM's word, no acknowledgement, all down), losing no line."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import zmq
from harness import PY, Endpoints, Harness, Proc, Writer, _inline_table, count_lines, output_lines, wait_for

from agent.config import AggregatorEndpoints, load_config
from agent.failover import Failover, rank
from fleetlog import curve
from fleetlog.tomlconf import ConfigError

# A line of the Writer: "w0#00000012 " and 60 x's, and its newline.
LINE_BYTES = 74
# The agents' in-flight window and batch size here: what an aggregator killed with -9 may have
# written without acknowledging it is at most one window plus the batch read when it was almost
# full, so at most this many lines of the union are in both outputs (the files sink).
WINDOW_BYTES = 1024 * 1024
BATCH_BYTES = 64 * 1024
MAX_DOUBLES = (WINDOW_BYTES + BATCH_BYTES) // LINE_BYTES


# ---- ranking and config (pure) ------------------------------------------------------------------


def aggs(n: int) -> tuple[AggregatorEndpoints, ...]:
    return tuple(AggregatorEndpoints(f"tcp://agg-{i}:5555", f"tcp://agg-{i}:5558") for i in range(n))


def test_ranking_is_stable_and_spreads_a_fleet_evenly() -> None:
    three = aggs(3)
    firsts = Counter(rank(f"web-{i:04d}", three)[0].control for i in range(3000))
    assert set(firsts) == {a.control for a in three}
    assert all(900 <= n <= 1100 for n in firsts.values()), firsts  # 1000 each, within 10%
    for name in ("web-0001", "db-7", "x"):
        order = rank(name, three)
        assert rank(name, three) == order                      # the same every time
        assert rank(name, tuple(reversed(three))) == order      # whatever the list's order
        assert rank(name, three[:1] + three[2:]) == [a for a in order if a != three[1]]
    # Removing an aggregator moves only the agents whose first choice it was.
    names = [f"web-{i:04d}" for i in range(600)]
    moved = [n for n in names
             if rank(n, three)[0] != three[1] and rank(n, three[::2])[0] != rank(n, three)[0]]
    assert moved == []


def test_moves_go_round_in_rank_order_and_wait_only_while_none_answers(
        caplog: pytest.LogCaptureFixture) -> None:
    """The choice alone: the first move away from one that answered is at once, then each one
    that never answered keeps its trial; going round without an answer is said once."""
    f = Failover("web-01", aggs(3), trial_s=60.0)
    order = list(f.ranked)
    f.on_answer()
    assert f.want("no reply") and f.wait_s() == 0.0
    assert f.move().target == order[1]
    assert f.want("no answer") and f.wait_s() > 59   # order[1] never answered: its trial first
    with caplog.at_level(logging.DEBUG, logger="fleetlog.agent.failover"):
        for expected in (order[2], order[0], order[1], order[2]):
            assert f.move().target == expected
    assert sum("no aggregator answers" in r.message for r in caplog.records) == 1
    # Three moves from ones that never answered (all three tried): then said once, then DEBUG.
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO", "WARNING", "DEBUG"]
    f.on_answer()
    assert f.current == order[2] and f.wait_s() == 0.0 and f.status()["switches"] == 5
    assert not Failover("web-01", aggs(1), trial_s=1.0).want("no reply")  # one: nowhere to go


def test_refused_connections_move_at_once_only_until_each_has_been_tried() -> None:
    """The choice alone: nothing accepting the connection ends a trial early, at most once per
    aggregator between two answers; then every move waits for its trial, refused or not."""
    f = Failover("web-01", aggs(3), trial_s=60.0)
    assert f.want("nothing accepts", refused=True) and f.wait_s() == 0.0  # never answered, first round
    f.move()
    assert f.want("nothing accepts", refused=True) and f.wait_s() == 0.0
    f.move()
    assert f.want("nothing accepts", refused=True) and f.wait_s() > 59    # each tried: the trial again
    f.move()
    assert f.want("nothing accepts", refused=True) and f.wait_s() > 59
    assert f.want("no answer") and f.wait_s() > 59
    f.move()
    f.on_answer()                                                         # one answers: a new round
    assert f.want("nothing accepts", refused=True) and f.wait_s() == 0.0
    f.move()
    assert not f.refused and f.want("no answer") and f.wait_s() > 59       # not refused: its trial
    assert not Failover("web-01", aggs(1), trial_s=1.0).want("nothing accepts", refused=True)


def agent_config(tmp: Path, *items: str) -> Any:
    return load_config(None, [f"agent.state_dir={tmp}", *items])


def test_aggregators_list_in_the_config(short_tmp: Path) -> None:
    cfg = agent_config(short_tmp, 'agent.aggregators=[{data="tcp://a:5555", control="tcp://a:5558"},'
                                  ' {data="ipc:///run/b.sock", control="tcp://b:5558"}]').agent
    assert cfg.aggregator_list == (AggregatorEndpoints("tcp://a:5555", "tcp://a:5558"),
                                   AggregatorEndpoints("ipc:///run/b.sock", "tcp://b:5558"))
    single = agent_config(short_tmp, "agent.data=tcp://c:1", "agent.control=tcp://c:2").agent
    assert single.aggregator_list == (AggregatorEndpoints("tcp://c:1", "tcp://c:2"),)
    bad = {
        'agent.aggregators=[{data="tcp://a:1", control="tcp://a:2"}]': "agent.aggregators: give either",
        "agent.aggregators=[]": "agent.aggregators: must be a non-empty list",
        'agent.aggregators=[{data="tcp://a:1"}]': "agent.aggregators[0].control: missing",
        'agent.aggregators=[{data="udp://a:1", control="tcp://a:2"}]': "agent.aggregators[0].data: 'udp://a:1'",
        'agent.aggregators=[{data="tcp://a:1", control="tcp://a:2", weight=3}]':
            "agent.aggregators[0].weight: unknown key",
        'agent.aggregators=[{data="tcp://a:1", control="tcp://a:2"}, {data="tcp://b:1", control="tcp://a:2"}]':
            "agent.aggregators[1].control: tcp://a:2 is also aggregators[0]'s",
    }
    for item, message in bad.items():
        extra = ["agent.data=tcp://x:1"] if "give either" in message else []
        with pytest.raises(ConfigError) as exc:
            agent_config(short_tmp, item, *extra)
        assert any(message in p for p in exc.value.problems), (item, exc.value.problems)


def test_check_config_validates_each_aggregator(short_tmp: Path) -> None:
    path = short_tmp / "agent.toml"
    path.write_text(f"""
[agent]
state_dir = "{short_tmp}/st"
aggregators = [ {{ data = "tcp://agg-a:5555", control = "tcp://agg-a:5558" }},
                {{ data = "tcp://agg-b:99999", control = "tcp://agg-b:5558" }} ]
""")
    r = subprocess.run([sys.executable, "-m", "agent", "--check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "agent.aggregators[1].data: port 99999 out of range" in r.stderr, r.stderr
    path.write_text(path.read_text().replace("99999", "5555"))
    r = subprocess.run([sys.executable, "-m", "agent", "--check-config", "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


# ---- real processes ------------------------------------------------------------------------------


def aggregator(h: Harness, ep: Endpoints, label: str, *extra: str) -> Proc:
    """Aggregator ``label`` with its own output and state directories (out-LABEL, agg-LABEL)."""
    args = [PY, "-m", "aggregator",
            "--set", f"aggregator.output_dir={h.root / f'out-{label}'}",
            "--set", f"aggregator.state_dir={h.root / f'agg-{label}'}",
            "--set", f"aggregator.pull={ep.pull}", "--set", f"aggregator.xsub={ep.xsub}",
            "--set", f"aggregator.xpub={ep.xpub}", "--set", f"aggregator.control={ep.control}",
            "--set", "aggregator.log_level=debug"]
    for item in extra:
        args += ["--set", item]
    return h._proc(f"aggregator-{label}", args).start()


def fresh(h: Harness, label: str, *extra: str) -> tuple[Endpoints, Proc]:
    """Aggregator ``label`` on free loopback ports, up (its log says ready). Another test run on
    this machine may take a port between free_port() and the bind: then new ports."""
    for _ in range(5):
        ep = h.endpoints(tcp=True)
        proc = aggregator(h, ep, label, *extra)
        wait_for(lambda p=proc: not p.alive() or " ready: " in p.log(), what=f"aggregator {label} up")
        if proc.alive():
            return ep, proc
        assert "Address already in use" in proc.log(), proc.log()
    raise AssertionError("no free ports for an aggregator in 5 tries")


def pair(h: Harness, *extra: str) -> tuple[dict[str, Endpoints], dict[str, Proc]]:
    """Aggregators a and b, up."""
    started = {label: fresh(h, label, *extra) for label in ("a", "b")}
    return {k: v[0] for k, v in started.items()}, {k: v[1] for k, v in started.items()}


def entry(ep: Endpoints, data: str | None = None) -> dict[str, Any]:
    return {"data": data or ep.pull, "control": ep.control}


def agent(h: Harness, entries: list[dict[str, Any]], topic: str, name: str, *extra: str) -> Proc:
    """An agent shipping h.root/logs-NAME/*.log as ``topic`` to the aggregators ``entries``."""
    state_dir = h.root / f"st-{name}"
    logs = h.root / f"logs-{name}"
    logs.mkdir(exist_ok=True)
    where = ([f"agent.aggregators=[{', '.join(_inline_table(e) for e in entries)}]"] if len(entries) > 1
             else [f"agent.data={entries[0]['data']}", f"agent.control={entries[0]['control']}"])
    args = [PY, "-m", "agent", "--set", f"agent.name={name}", "--set", f"agent.state_dir={state_dir}",
            "--set", "agent.rescan_interval_ms=300", "--set", "agent.ack_timeout_ms=1500",
            "--set", "agent.heartbeat_interval_ms=300", "--set", "agent.log_level=debug",
            "--set", f"agent.max_inflight_bytes={WINDOW_BYTES}",
            "--set", f"agent.batch_max_bytes={BATCH_BYTES}",
            "--set", f"sources=[{{paths = [\"{logs}/*.log\"], topic = \"{topic}\"}}]"]
    for item in [*where, *extra]:
        args += ["--set", item]
    proc = h._proc(f"agent-{name}", args)
    proc.state_dir = state_dir
    return proc.start()


def writer(h: Harness, name: str, n_files: int = 3, **kw: Any) -> Writer:
    (h.root / f"logs-{name}").mkdir(exist_ok=True)
    return Writer({f"{name}{i}": h.path(f"logs-{name}", f"{name}{i}.log") for i in range(n_files)},
                  **kw).start()


def name_preferring(first: Endpoints, eps: list[Endpoints], prefix: str) -> str:
    """An agent name whose rank puts ``first`` first."""
    listed = tuple(AggregatorEndpoints(e.pull, e.control) for e in eps)
    return next(f"{prefix}{i}" for i in itertools.count() if rank(f"{prefix}{i}", listed)[0].control
                == first.control)


def in_use(h: Harness, name: str) -> str | None:
    s = h.agent_status(name)
    return s["aggregators"]["in_use"]["control"] if s and s["aggregators"] else None


def ids_by_tag(lines: list[str]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for line in lines:
        tag, sep, n = line.split(" ", 1)[0].partition("#")
        if sep and n.isdigit():
            seen.setdefault(tag, []).append(int(n))
    return seen


def check_union(outputs: list[list[str]], counts: dict[str, int], max_doubles: int) -> int:
    """Every line of ``counts`` in the union of ``outputs``; in each output, each source's lines
    once and in order; lines in two outputs at most ``max_doubles``. Returns the doubles."""
    union: dict[str, Counter[int]] = {tag: Counter() for tag in counts}
    for lines in outputs:
        for tag, ids in ids_by_tag(lines).items():
            assert tag in counts, f"unexpected tag {tag}"
            assert all(a < b for a, b in itertools.pairwise(ids)), f"{tag}: twice or out of order"
            union[tag].update(ids)
    doubles = 0
    for tag, count in counts.items():
        missing = sorted(set(range(count)) - set(union[tag]))
        assert not missing, f"{tag}: {len(missing)} lines lost (first {missing[:5]})"
        assert set(union[tag]) == set(range(count)), f"{tag}: lines that were never written"
        doubles += sum(n - 1 for n in union[tag].values())
    assert doubles <= max_doubles, f"{doubles} lines in both outputs, more than {max_doubles}"
    return doubles


def all_acknowledged(h: Harness, name: str) -> bool:
    s = h.agent_status(name)
    return (s is not None and bool(s["files"]) and s["lag_bytes"] == 0 and s["inflight_bytes"] == 0
            and all(f["lag_bytes"] == 0 for f in s["files"]))


def outputs(h: Harness, topic: str, *labels: str) -> list[list[str]]:
    return [output_lines(h.root / f"out-{label}", topic) for label in labels]


def test_aggregator_killed_agent_moves_to_the_next_and_loses_nothing(h: Harness) -> None:
    """kill -9 of the aggregator in use while lines flow: the agent moves to the next in its
    order, ships everything not acknowledged again there, and every line is in the union of the
    two outputs. With the files sink, lines the killed one committed but had not acknowledged
    are in both (at most the agent's in-flight window); each output holds each file's lines
    once and in order."""
    eps, procs = pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "n")
    w = writer(h, name)
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name)
    wait_for(lambda: count_lines(h.root / "out-a" / "app" / "app.log") > 2000, what="lines through a")
    assert in_use(h, name) == eps["a"].control
    procs["a"].kill9()
    wait_for(lambda: in_use(h, name) == eps["b"].control, what="the agent on b")
    wait_for(lambda: count_lines(h.root / "out-b" / "app" / "app.log") > 2000, what="lines through b")
    counts = w.stop()
    wait_for(lambda: all_acknowledged(h, name), timeout=60, what="every line acknowledged by b")
    check_union(outputs(h, "app", "a", "b"), counts, max_doubles=MAX_DOUBLES)
    s = h.agent_status(name)
    assert s is not None and s["aggregators"]["switches"] == 1
    assert s["aggregators"]["last_switch"]["from"] == eps["a"].control
    # Its heartbeat timeout (0.9 s here) and its refused connections (for as long) race.
    reason = s["aggregators"]["last_switch"]["reason"]
    assert "no reply" in reason or "nothing accepts the" in reason, reason
    log = next(p for p in h.procs if p.name == f"agent-{name}").log()
    assert log.count("switching aggregator:") == 1
    text = subprocess.run([PY, "-m", "agent", "status", "--set", f"agent.state_dir={h.root / f'st-{name}'}"],
                          capture_output=True, text=True, timeout=20).stdout
    assert (f"aggregators in this agent's order: {eps['a'].control}, {eps['b'].control} (in use); 1 switch,"
            f" the last from {eps['a'].control} to {eps['b'].control}: {reason}") in text, text
    h.ep = eps["b"]
    h.assert_quiet(eps["b"])


def test_sigterm_of_the_aggregator_in_use_moves_its_agents_at_once(h: Harness) -> None:
    """An aggregator stopping tells its agents; one with another aggregator moves at once (its
    heartbeat timeout here is 15 s, far beyond the wait) and stays there when the first comes
    back (sticky); one with that aggregator only waits for it and loses nothing."""
    eps, procs = pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "m")
    w = writer(h, name)
    solo = writer(h, "solo")
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name, "agent.heartbeat_interval_ms=5000")
    agent(h, [entry(eps["a"])], "solo", "solo")
    out_a = h.root / "out-a"
    wait_for(lambda: count_lines(out_a / "app" / "app.log") > 1000
             and count_lines(out_a / "solo" / "solo.log") > 1000, what="lines of both agents through a")
    # Both known to a (their hellos answered: batches go before), so that it can tell them.
    wait_for(lambda: all((s := h.agent_status(n)) is not None and s["aggregator"] is not None
                         for n in (name, "solo")), what="both agents connected to a")
    assert procs["a"].stop(signal.SIGTERM) == 0
    wait_for(lambda: in_use(h, name) == eps["b"].control, timeout=10, what="the agent moved to b")
    s = h.agent_status(name)
    # Told it stops, or (under load, the stopping event a moment late) its data port refusing:
    # either way at once, not after the 15 s heartbeat timeout.
    reason = s["aggregators"]["last_switch"]["reason"] if s is not None else ""
    assert "stopping" in reason or "nothing accepts" in reason, reason
    # The agent with a alone sees a's ports refuse for a while (5 attempts: over 2 s): that is
    # a's restart, not a wrong `data` endpoint, and it must not say so (it did, at WARNING).
    wait_for(lambda: (x := h.agent_status("solo")) is not None
             and x["links"]["data"]["refused_attempts"] >= 5, what="solo's data connection refused a while")
    procs["a"] = aggregator(h, eps["a"], "a")
    counts, solo_counts = w.stop(), solo.stop()
    wait_for(lambda: all_acknowledged(h, name) and all_acknowledged(h, "solo"), timeout=60,
             what="every line acknowledged")
    # The stopping aggregator acknowledged what it committed before saying so: no line twice.
    check_union(outputs(h, "app", "a", "b"), counts, max_doubles=0)
    check_union(outputs(h, "solo", "a"), solo_counts, max_doubles=0)
    assert in_use(h, name) == eps["b"].control  # sticky: a is back, the agent stays on b
    # a remembers the agent (its registry) and does not call it down: it has another aggregator.
    row = next(x for x in h.ctl(eps["a"], "status").stdout.splitlines() if x.startswith(name + " "))
    assert "not here" in row and " NO " not in row, row
    solo_status = h.agent_status("solo")
    assert solo_status is not None and solo_status["aggregators"]["switches"] == 0
    assert len(solo_status["aggregators"]["ranked"]) == 1
    solo_log = next(p for p in h.procs if p.name == "agent-solo").log()
    assert solo_log.count("is stopping; waiting for it to come back") == 1
    assert "nothing accepts the data connection" not in solo_log, solo_log[-3000:]
    h.ep = eps["a"]
    h.assert_quiet(eps["a"])


def back_on_b(h: Harness, eps: dict[str, Endpoints], procs: dict[str, Proc], name: str, w: Writer) -> None:
    """Start aggregator b again, wait until agent ``name`` ships to it, stop writing and check that
    every line is acknowledged by b and in a's and b's outputs together."""
    procs["b"] = aggregator(h, eps["b"], "b")
    wait_for(lambda: in_use(h, name) == eps["b"].control and count_lines(h.root / "out-b" / "app" / "app.log")
             > 1000, timeout=30, what="the agent shipping to b")
    counts = w.stop()
    wait_for(lambda: all_acknowledged(h, name), timeout=60, what="every line acknowledged by b")
    check_union(outputs(h, "app", "a", "b"), counts, max_doubles=MAX_DOUBLES)


def test_both_aggregators_down_then_one_back_ships_again_quietly(h: Harness) -> None:
    eps, procs = pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "d")
    w = writer(h, name)
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name)
    wait_for(lambda: count_lines(h.root / "out-a" / "app" / "app.log") > 1000, what="lines through a")
    procs["a"].kill9()
    procs["b"].kill9()
    # Round and round, a trial (three 300 ms heartbeats) each: quiet all the same.
    wait_for(lambda: (s := h.agent_status(name)) is not None and s["aggregators"]["switches"] >= 4,
             timeout=30, what="the agent trying each in turn")
    h.assert_quiet(None)
    back_on_b(h, eps, procs, name, w)
    log = next(p for p in h.procs if p.name == f"agent-{name}").log()
    assert log.count("no aggregator answers (tried all 2)") == 1
    h.ep = eps["b"]
    h.assert_quiet(eps["b"])


def test_no_acknowledgement_moves_to_the_next_and_loses_nothing(h: Harness) -> None:
    """The first aggregator answers heartbeats but never acknowledges (its data endpoint here is
    a socket nobody reads): after two ack timeouts the agent moves on, and the second has every
    line once."""
    eps, _ = pair(h)
    ctx = zmq.Context()
    void = ctx.socket(zmq.PULL)
    void.setsockopt(zmq.RCVHWM, 1)
    void.setsockopt(zmq.LINGER, 0)
    port = void.bind_to_random_port("tcp://127.0.0.1")
    try:
        name = name_preferring(eps["a"], list(eps.values()), "q")
        w = writer(h, name, limit=3000)
        agent(h, [entry(eps["a"], data=f"tcp://127.0.0.1:{port}"), entry(eps["b"])], "app", name)
        wait_for(lambda: in_use(h, name) == eps["b"].control, timeout=30, what="the agent moved to b")
        s = h.agent_status(name)
        assert s is not None and "no acknowledgement" in s["aggregators"]["last_switch"]["reason"]
        wait_for(lambda: w.total == 9000 and all_acknowledged(h, name), timeout=60, what="every line")
        counts = w.stop()
        assert output_lines(h.root / "out-a", "app") == []
        check_union(outputs(h, "app", "b"), counts, max_doubles=0)
        h.ep = eps["b"]
        h.assert_quiet(eps["b"])
    finally:
        void.close(linger=0)
        ctx.term()


def test_a_single_aggregator_agent_waits_for_it_as_before(h: Harness) -> None:
    """The single data/control pair: no ranking, no moves; kill -9 and restart of the
    aggregator cost a wait and a resend, as ever."""
    ep, agg = fresh(h, "a")
    w = writer(h, "s")
    agent(h, [entry(ep)], "app", "s")
    wait_for(lambda: count_lines(h.root / "out-a" / "app" / "app.log") > 1000, what="first lines")
    # Its hello answered (batches go before): under load the kill came first, and the agent,
    # which had never known that instance, rightly did not call the next one a restart.
    wait_for(lambda: (s := h.agent_status("s")) is not None and s["aggregator"] is not None,
             what="the agent's hello answered")
    agg.kill9()
    time.sleep(1.5)  # five heartbeat intervals with the aggregator down: nothing to move to
    aggregator(h, ep, "a")
    counts = w.stop()
    wait_for(lambda: all_acknowledged(h, "s"), timeout=60, what="every line acknowledged")
    check_union(outputs(h, "app", "a"), counts, max_doubles=0)
    s = h.agent_status("s")
    assert s is not None and s["aggregators"]["switches"] == 0 and s["aggregators"]["last_switch"] is None
    log = agent_log(h, "s")
    assert "switching aggregator" not in log and "nothing accepts" not in log
    # The log says what happened: the aggregator restarted (it said "a restart, or a move").
    assert "it restarted (it was instance " in log and "is new to this agent" not in log, log[-3000:]
    h.ep = ep
    h.assert_quiet(ep)


def test_refused_by_the_first_aggregator_moves_to_the_next(h: Harness) -> None:
    """The first aggregator refuses this agent's CURVE key (not in its authorized_keys_dir): the
    agent says so once and moves to the next, which has every line once. Both share the
    aggregators' key pair, as a fleet's aggregators do."""
    keys = h.root / "keys"
    for name in ("aggregator", "agent"):
        curve.generate(str(keys), name)
    for label, authorised in (("a", False), ("b", True)):
        (h.root / f"keys-{label}").mkdir()
        if authorised:
            shutil.copy(keys / "agent.key", h.root / f"keys-{label}")
    eps = {label: fresh(h, label, f"aggregator.curve_secret_key={keys / 'aggregator.key_secret'}",
                        f"aggregator.authorized_keys_dir={h.root / f'keys-{label}'}")[0]
           for label in ("a", "b")}
    name = name_preferring(eps["a"], list(eps.values()), "r")
    w = writer(h, name, limit=2000)
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name,
          f"agent.curve_secret_key={keys / 'agent.key_secret'}",
          f"agent.curve_server_key={keys / 'aggregator.key'}")
    wait_for(lambda: in_use(h, name) == eps["b"].control, timeout=30, what="the agent moved to b")
    s = h.agent_status(name)
    assert s is not None and "refuse" in s["aggregators"]["last_switch"]["reason"]
    wait_for(lambda: w.total == 6000 and all_acknowledged(h, name), timeout=60, what="every line")
    check_union(outputs(h, "app", "b"), w.stop(), max_doubles=0)
    assert output_lines(h.root / "out-a", "app") == []
    # It says what it does: it moves on (it said "retrying with back-off" and went).
    log = agent_log(h, name)
    assert "refuses this agent's CURVE key" in log and "(trying the next aggregator)" in log, log[-3000:]
    assert "retrying with back-off" not in log
    assert "connected to aggregator" in log and f"after the move from {eps['a'].control}" in log, log[-3000:]
    h.ep = eps["b"]
    h.assert_quiet(eps["b"])


def test_back_to_an_aggregator_that_is_behind_continues_from_the_acknowledged_offsets(h: Harness) -> None:
    """a killed (the agent moves to b), a back, b killed (the agent moves back to a): a last had
    each stream where the agent left it, b took them further. a asks for its old offsets; the
    agent continues from what b acknowledged (no line of b's again in a's output), quietly."""
    eps, procs = pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "k")
    w = writer(h, name)
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name)
    out = {label: h.root / f"out-{label}" / "app" / "app.log" for label in eps}
    wait_for(lambda: count_lines(out["a"]) > 1000, what="lines through a")
    procs["a"].kill9()
    wait_for(lambda: in_use(h, name) == eps["b"].control and count_lines(out["b"]) > 3000,
             timeout=30, what="lines through b")
    procs["a"] = aggregator(h, eps["a"], "a")
    wait_for(lambda: h.status(eps["a"]), what="a back")
    at_a = count_lines(out["a"])
    procs["b"].kill9()
    wait_for(lambda: in_use(h, name) == eps["a"].control and count_lines(out["a"]) > at_a + 3000,
             timeout=30, what="lines through a again")
    counts = w.stop()
    wait_for(lambda: all_acknowledged(h, name), timeout=60, what="every line acknowledged by a")
    check_union(outputs(h, "app", "a", "b"), counts, max_doubles=2 * MAX_DOUBLES)
    s = h.agent_status(name)
    assert s is not None and s["aggregators"]["switches"] == 2 and s["rebased_streams"] >= 1
    log = next(p for p in h.procs if p.name == f"agent-{name}").log()
    assert "rebasing the stream" not in log  # expected with several aggregators: not a WARNING
    h.ep = eps["a"]
    h.assert_quiet(eps["a"])


def test_agent_stopped_while_it_moves_to_another_aggregator_exits_promptly(h: Harness) -> None:
    """SIGTERM to an agent whose aggregator has just died: it moves to the next one while it
    waits for its last acknowledgements, and still exits within its shutdown bound (it hung for
    ever: the move woke its heartbeat task just as shutdown cancelled it), saving checkpoints."""
    eps, procs = pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "q")
    procs["b"].kill9()  # the next one does not answer either: the move is made, never completed
    w = writer(h, name)
    proc = agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name)
    wait_for(lambda: in_use(h, name) == eps["a"].control
             and (s := h.agent_status(name)) is not None and s["aggregator"] is not None,
             what="the agent connected to a")
    procs["a"].kill9()
    assert proc.stop(signal.SIGTERM, timeout=15) == 0
    w.stop()
    # (It usually logs "switching aggregator" first; on a slow machine the wait may end before.)
    assert "agent stopped" in proc.log(), proc.log()[-2000:]


# ---- nothing accepting the connection ------------------------------------------------------------

# A heartbeat timeout (three beats) of 30 s and an ack timeout as long: a move within the tests'
# bounds below is made on the refusal, not on either timeout.
SLOW_TIMEOUTS = ("agent.heartbeat_interval_ms=10000", "agent.ack_timeout_ms=30000")


def ipc_pair(h: Harness, start: tuple[str, ...] = ("a", "b")) -> tuple[dict[str, Endpoints], dict[str, Proc]]:
    """Aggregators a and b on ipc:// sockets of their own; those in ``start`` up (the others'
    socket files do not exist)."""
    eps, procs = {}, {}
    for label in ("a", "b"):
        (h.root / label).mkdir()
        eps[label] = Endpoints(*(f"ipc://{h.root / label}/{n}.sock" for n in ("pull", "xsub", "xpub", "ctl")))
        if label in start:
            procs[label] = aggregator(h, eps[label], label)
            wait_for(lambda p=procs[label]: " ready: " in p.log(), what=f"aggregator {label} up")
    return eps, procs


def agent_log(h: Harness, name: str) -> str:
    return next(p for p in h.procs if p.name == f"agent-{name}").log()


@pytest.mark.parametrize(("transport", "mode"), [("tcp", "push"), ("ipc", "push"), ("tcp", "pub")])
def test_an_agent_moves_to_its_second_aggregator_as_soon_as_the_first_refuses(
        h: Harness, transport: str, mode: str) -> None:
    """kill -9 of the aggregator in use: its port closes (tcp: ECONNREFUSED; ipc: the socket
    file stays and refuses). The agent moves to the next once connections have been refused for
    a second, not after its heartbeat timeout (30 s here; it waited that long), and loses
    nothing."""
    eps, procs = pair(h) if transport == "tcp" else ipc_pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "f")
    w = writer(h, name)
    agent(h, [entry(e, data=e.pull if mode == "push" else e.xsub) for e in (eps["a"], eps["b"])], "app",
          name, *SLOW_TIMEOUTS, f"agent.mode={mode}")
    wait_for(lambda: count_lines(h.root / "out-a" / "app" / "app.log") > 1000
             and (s := h.agent_status(name)) is not None and s["aggregator"] is not None,
             what="lines through a, its hello answered")
    procs["a"].kill9()
    killed_at = time.monotonic()
    wait_for(lambda: in_use(h, name) == eps["b"].control, timeout=20, what="the agent moved to b")
    assert time.monotonic() - killed_at < 30  # the heartbeat timeout did not move it (a bound, not a speed)
    s = h.agent_status(name)
    assert s is not None and s["aggregators"]["switches"] == 1
    assert "nothing accepts the" in s["aggregators"]["last_switch"]["reason"], s["aggregators"]
    counts = w.stop()
    wait_for(lambda: all_acknowledged(h, name), timeout=60, what="every line acknowledged by b")
    check_union(outputs(h, "app", "a", "b"), counts, max_doubles=MAX_DOUBLES)
    log = agent_log(h, name)
    assert log.count("switching aggregator:") == 1 and "WARNING" not in log, log[-3000:]
    h.ep = eps["b"]
    h.assert_quiet(eps["b"])


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_an_agent_started_while_its_first_aggregator_is_down_ships_to_the_second_at_once(
        h: Harness, transport: str) -> None:
    """The first in the agent's order is not there (tcp: nothing listens on its ports, refused;
    ipc: its socket files do not exist, ENOENT): the agent does not give it a whole trial (a
    heartbeat timeout, 30 s here) before trying the next."""
    if transport == "tcp":
        eps, procs = pair(h)
        procs["a"].kill9()
    else:
        eps, procs = ipc_pair(h, start=("b",))
    name = name_preferring(eps["a"], list(eps.values()), "g")
    w = writer(h, name, limit=2000)
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name, *SLOW_TIMEOUTS)
    wait_for(lambda: in_use(h, name) == eps["b"].control, timeout=20, what="the agent moved to b")
    wait_for(lambda: w.total == 6000 and all_acknowledged(h, name), timeout=60, what="every line")
    check_union(outputs(h, "app", "b"), w.stop(), max_doubles=0)
    s = h.agent_status(name)
    assert s is not None and s["aggregators"]["switches"] == 1
    h.ep = eps["b"]
    h.assert_quiet(eps["b"])


def test_one_aggregator_restarting_does_not_make_the_agent_churn(h: Harness) -> None:
    """The aggregator in use is killed and started again at once, three times (as systemd's
    Restart= does): each restart costs the agent at most one move (to the other one, if the
    restart outlasts the refusal's grace), never a move back and forth, and it is quiet after."""
    eps, procs = pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "c")
    w = writer(h, name)
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name, "agent.heartbeat_interval_ms=1000")
    label_of = {eps[label].control: label for label in eps}
    for restart in range(3):
        wait_for(lambda: (s := h.agent_status(name)) is not None and s["aggregator"] is not None,
                 what="the agent connected")
        label = label_of[in_use(h, name) or ""]
        before = sum(map(len, outputs(h, "app", "a", "b")))
        procs[label].kill9()
        procs[label] = aggregator(h, eps[label], label)
        wait_for(lambda n=before: sum(map(len, outputs(h, "app", "a", "b"))) > n + 1000, timeout=30,
                 what=f"lines flowing again after restart {restart + 1}")
        s = h.agent_status(name)
        assert s is not None and s["aggregators"]["switches"] <= restart + 1, s["aggregators"]
    counts = w.stop()
    wait_for(lambda: all_acknowledged(h, name), timeout=60, what="every line acknowledged")
    check_union(outputs(h, "app", "a", "b"), counts, max_doubles=3 * MAX_DOUBLES)
    log = agent_log(h, name)
    assert log.count("switching aggregator:") <= 3 and "no aggregator answers" not in log, log[-3000:]
    h.ep = eps[label_of[in_use(h, name) or ""]]
    h.assert_quiet(h.ep)


def test_two_aggregators_down_are_tried_no_faster_than_the_trial(h: Harness) -> None:
    """Both aggregators killed: refused connections move the agent on at once only until each
    one has been tried; then it goes round at one heartbeat timeout (3 s here) per aggregator,
    as before, quietly."""
    eps, procs = pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "p")
    w = writer(h, name)
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name, "agent.heartbeat_interval_ms=1000",
          "agent.ack_timeout_ms=30000")
    wait_for(lambda: (s := h.agent_status(name)) is not None and s["aggregator"] is not None
             and count_lines(h.root / "out-a" / "app" / "app.log") > 1000, what="lines through a")
    procs["a"].kill9()
    procs["b"].kill9()
    wait_for(lambda: "no aggregator answers (tried all 2)" in agent_log(h, name), timeout=30,
             what="the agent having tried both")
    s0, t0 = h.agent_status(name), time.monotonic()
    h.assert_quiet(None)
    time.sleep(7.0)  # the window measured: going round at most once per 3 s trial
    s1, t1 = h.agent_status(name), time.monotonic()
    assert s0 is not None and s1 is not None
    moves = s1["aggregators"]["switches"] - s0["aggregators"]["switches"]
    assert moves <= (t1 - t0) / 3.0 + 1, (moves, t1 - t0)
    back_on_b(h, eps, procs, name, w)
    h.ep = eps["b"]
    h.assert_quiet(eps["b"])


def reset_connections_to(endpoint: str) -> int:
    """Reset (RST) every loopback TCP connection to ``endpoint``'s port, as a middlebox or a
    conntrack flush does, with ``ss -K``; how many were reset (-1: ss cannot here)."""
    port = endpoint.rsplit(":", 1)[1]
    r = subprocess.run(["ss", "-K", "-t", "-n", "dst", "127.0.0.1", "dport", "=", f":{port}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return -1
    return sum(1 for line in r.stdout.splitlines() if "ESTAB" in line)


def test_a_reset_connection_to_an_aggregator_that_is_there_moves_nothing(h: Harness) -> None:
    """The agent's connections to the aggregator in use are reset while lines flow: ZeroMQ
    connects again at once, so the drop is no evidence the aggregator is gone. The agent stays
    (its heartbeat timeout is 30 s: only the refused-connection rule could move it), reconnects,
    loses nothing and is quiet."""
    if os.geteuid() != 0 or shutil.which("ss") is None:
        pytest.skip("needs root and ss (iproute2) to reset connections")
    eps, _ = pair(h)
    name = name_preferring(eps["a"], list(eps.values()), "x")
    w = writer(h, name)
    agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name, "agent.heartbeat_interval_ms=10000")
    out_a = h.root / "out-a" / "app" / "app.log"
    wait_for(lambda: count_lines(out_a) > 1000 and (s := h.agent_status(name)) is not None
             and s["aggregator"] is not None, what="lines through a, its hello answered")
    for endpoint in (eps["a"].control, eps["a"].pull):
        reset = reset_connections_to(endpoint)
        if reset < 1:
            pytest.skip(f"ss -K cannot reset connections here (kernel without SOCK_DESTROY?): {reset}")
    wait_for(lambda: (s := h.agent_status(name)) is not None
             and all(link["handshakes"] >= 2 for link in s["links"].values()), what="both links made again")
    before = count_lines(out_a)
    wait_for(lambda: count_lines(out_a) > before + 1000, timeout=30, what="lines through a again")
    counts = w.stop()
    wait_for(lambda: all_acknowledged(h, name), timeout=60, what="every line acknowledged by a")
    check_union(outputs(h, "app", "a", "b"), counts, max_doubles=0)
    s = h.agent_status(name)
    assert s is not None and s["aggregators"]["switches"] == 0, s["aggregators"]
    assert in_use(h, name) == eps["a"].control
    h.ep = eps["a"]
    h.assert_quiet(eps["a"])


def test_an_aggregator_that_answers_during_its_trial_is_still_watched(h: Harness) -> None:
    """The first aggregator refuses the agent's key, so the agent asks to move, but gives it its
    trial (a heartbeat timeout: 18 s here) as it never answered; the key is authorised and it
    answers within the trial, so the agent stays. Its connections are still watched after that:
    killed, it is left once nothing accepts the connection (the watch had ended with the trial,
    and the agent waited its whole heartbeat timeout)."""
    keys = h.root / "keys"
    for name in ("aggregator", "agent"):
        curve.generate(str(keys), name)
    for label in ("a", "b"):
        (h.root / f"keys-{label}").mkdir()
    shutil.copy(keys / "agent.key", h.root / "keys-b")
    started = {label: fresh(h, label, f"aggregator.curve_secret_key={keys / 'aggregator.key_secret'}",
                            f"aggregator.authorized_keys_dir={h.root / f'keys-{label}'}")
               for label in ("a", "b")}
    eps = {label: v[0] for label, v in started.items()}
    name = name_preferring(eps["a"], list(eps.values()), "t")
    w = writer(h, name)
    proc = agent(h, [entry(eps["a"]), entry(eps["b"])], "app", name,
                 f"agent.curve_secret_key={keys / 'agent.key_secret'}",
                 f"agent.curve_server_key={keys / 'aggregator.key'}",
                 "agent.heartbeat_interval_ms=6000", "agent.ack_timeout_ms=30000")
    wait_for(lambda: "refuses this agent's CURVE key" in proc.log(), what="a refusing the agent's key")
    shutil.copy(keys / "agent.key", h.root / "keys-a")
    assert started["a"][1].popen is not None
    started["a"][1].popen.send_signal(signal.SIGHUP)
    wait_for(lambda: count_lines(h.root / "out-a" / "app" / "app.log") > 1000, timeout=30,
             what="lines through a once the key is authorised")
    wait_for(lambda: "answered during its trial: staying" in proc.log(), timeout=30, what="a's trial over")
    assert in_use(h, name) == eps["a"].control
    started["a"][1].kill9()
    wait_for(lambda: in_use(h, name) == eps["b"].control, timeout=15, what="the agent moved to b")
    s = h.agent_status(name)
    assert s is not None and "nothing accepts the" in s["aggregators"]["last_switch"]["reason"], s
    counts = w.stop()
    wait_for(lambda: all_acknowledged(h, name), timeout=60, what="every line acknowledged by b")
    check_union(outputs(h, "app", "a", "b"), counts, max_doubles=MAX_DOUBLES)
    h.ep = eps["b"]
    h.assert_quiet(eps["b"])
