"""``fleetlog-agent`` / ``python -m agent``: argv, logging and exit codes live here.

    fleetlog-agent [--config PATH] [--set KEY=VALUE]...       run the agent
    fleetlog-agent --check-config [--config PATH]             validate and exit
    fleetlog-agent status [--json] [--config PATH]            ask the running agent
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

import orjson
import zmq

from agent.config import Config, load_config
from agent.daemon import Agent
from fleetlog import __version__, curve, runtime, wire
from fleetlog.cli import RefusalWatch, die_quietly_on_closed_pipe, nothing_listens
from fleetlog.dirlock import DirectoryInUse
from fleetlog.tomlconf import ConfigError

log = logging.getLogger("fleetlog.agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fleetlog-agent",
        description="Follow log files (and the systemd journal) on this host and ship every new "
                    "line, exactly once, to a fleetlog aggregator.",
        epilog="Run as a service (systemd unit fleetlog-agent). SIGTERM stops it cleanly, SIGHUP "
               "reloads its [[sources]] ([agent] settings need a restart). Exit status: 0 ok, "
               "1 could not start, 2 bad config or usage, 3 (status) no agent answered. "
               "Examples: fleetlog-agent --check-config; fleetlog-agent status; "
               "fleetlog-agent status --json | jq '.files[] | {path, lag_bytes}'")
    p.add_argument("command", nargs="?", choices=["run", "status"], default="run",
                   help="run the agent (default), or ask a running one for its status")
    p.add_argument("--config", metavar="PATH",
                   help="TOML config (default /etc/fleetlog/agent.toml if it exists, else built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set agent.mode=pub")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--json", action="store_true", help="with status: one JSON object")
    p.add_argument("--timeout", type=float, default=3.0, help="with status: seconds to wait")
    p.add_argument("--version", action="version", version=f"fleetlog {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set, check_dirs=args.command == "run")
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"fleetlog-agent: config: {problem}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"fleetlog-agent: {config.source}: ok ({len(config.sources)} sources, "
              f"{len(config.journals)} journal sources)")
        return 0
    if args.command == "status":
        die_quietly_on_closed_pipe()
        return status(config, args.json, args.timeout)
    runtime.setup_logging(config.agent.log_level)
    if not config.sources and not config.journals:
        log.warning("no [[sources]] or [[journal]] configured: nothing to follow")
    return runtime.run(_serve(config), loop=config.agent.loop)


async def _serve(config: Config) -> int:
    agent = Agent(config)
    trim = asyncio.create_task(_release_start_up_memory(agent), name="release start-up memory")
    try:
        runtime.install_signals(agent.request_stop, agent.reload)
        await agent.serve()
    except (zmq.ZMQError, OSError, curve.KeyError_, DirectoryInUse) as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        trim.cancel()
    if runtime.failed_tasks:
        log.error("stopped after a fatal error in %s", ", ".join(runtime.failed_tasks))
        return 1
    return 0


async def _release_start_up_memory(agent: Agent) -> None:
    """Once the agent runs, what start-up freed goes back to the kernel (fleetlog/runtime.py)."""
    await agent.started.wait()
    runtime.release_free_memory()


def status(config: Config, as_json: bool, timeout_s: float) -> int:
    endpoint = config.agent.status_endpoint
    if (absent := nothing_listens(endpoint)) is not None:
        print(f"fleetlog-agent: no agent at {endpoint}: {absent}; is it running?", file=sys.stderr)
        return 3
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    watch = RefusalWatch(sock)
    try:
        sock.connect(endpoint)
        sock.send(wire.encode_request(1, "status"))
        deadline = time.monotonic() + timeout_s
        while not sock.poll(100):
            if watch.refused() or time.monotonic() > deadline:
                why = "nothing listens" if watch.refused() or not watch.connected else \
                    f"no answer within {timeout_s:g}s"
                print(f"fleetlog-agent: no agent at {endpoint}: {why}; is it running?", file=sys.stderr)
                return 3
        reply = wire.decode_control(sock.recv())
    finally:
        watch.close()
        sock.close(linger=0)
        ctx.term()
    if not reply.get("ok"):
        print(f"fleetlog-agent: {reply.get('error')}", file=sys.stderr)
        return 1
    s = reply["result"]
    if as_json:
        sys.stdout.write(orjson.dumps(s).decode() + "\n")
        return 0
    print_status(s)
    return 0


def print_status(s: dict[str, Any]) -> None:
    """``fleetlog-agent status`` as text: what ``--json`` has, one line per thing worth a look."""
    print(f"agent {s['agent']} ({s['mode']} to {s['data']}, aggregator {s['aggregator'] or 'not connected'})")
    aggs = s.get("aggregators")
    if aggs and len(aggs["ranked"]) > 1:
        order = ", ".join(a["control"] + (" (in use)" if a["in_use"] else "") for a in aggs["ranked"])
        last = aggs["last_switch"]
        n = aggs["switches"]
        moved = (f"; {n} switch{'' if n == 1 else 'es'}, the last from {last['from']} to {last['to']}: "
                 f"{last['reason']}") if last else ""
        print(f"aggregators in this agent's order: {order}{moved}")
    for problem in s.get("problems", []):
        print(f"problem: {problem}")
    n_files = len(s["files"])
    plural = "" if n_files == 1 else "s"
    print(f"{n_files} file{plural}, {s['open_files']} open, lag {s['lag_bytes']} bytes, in flight "
          f"{s['inflight_bytes']} of a {s['window_bytes']} byte window, {s['lines_shipped']} lines shipped "
          f"(acknowledged), {s['resends']} resends")
    for src in s.get("sources", []):
        empty = f"; matching nothing: {', '.join(src['empty_globs'])}" if src["empty_globs"] else ""
        print(f"source [{src['topic']}] {', '.join(src['paths'])}: {len(src['files'])} files{empty}")
    print_files(s)


def print_files(s: dict[str, Any]) -> None:
    """The status's files, journal sources, and the files it does not follow and why."""
    for f in s["files"]:
        flags = ("rotated " if f["rotated"] else "") + ("" if f["open"] else "closed")
        print(f"  {f['path']}  [{f['topic']}] id {f['identity']}  offset {f['offset']}/{f['size']}  "
              f"lag {f['lag_bytes']}  {flags}".rstrip())
    for u in s.get("unreadable", []):
        print(f"unreadable: {u['path']} (id {u['identity']}): {u['reason']}")
    for f in s.get("failing", []):
        print(f"failing: id {f['identity']}: {f['error']}")
    for u in s.get("unfollowed", []):
        print(f"unfollowed (no source matches it; kept where it was left): {u['path']}  [{u['topic']}]  "
              f"offset {u['offset']}/{u['size']}")
    for k in s.get("skipped", []):
        print(f"skipped (not a log file): {k['path']}: {k['what']}")
    extra = [f"{s[key]} {words}" for key, words in (("copies_ignored", "copies ignored"),
                                                    ("nul_bytes_skipped", "NUL bytes skipped"))
             if s.get(key)]
    if extra:
        print(", ".join(extra))
    for j in s.get("journal", []):
        reader = ("reading" if j["reader_running"]
                  else f"journalctl not running ({j['reader_restarts']} restarts)")
        if "machines" in j:
            reader += f" ({len(j['machines'])} machines)"
        # The whole selection, as --json has it: the field matches, then the priority filter.
        priority = [f"priority {j['priority']} or more urgent"] if j.get("priority") else []
        selection = [*j["matches"], *priority]
        counts = "".join(f", {j[key]} {word}" for key, word in (("entries_missing", "missing"),
                                                               ("entries_cut", "cut")) if j.get(key))
        print(f"  {j['path']}  [{j['topic']}] {' '.join(selection) or 'all entries'}  "
              f"{j['entries_acked']} entries acknowledged, lag {j['lag_entries']} entries / {j['lag_s']:.1f}s"
              f"{counts}  {reader}")


if __name__ == "__main__":
    sys.exit(main())
