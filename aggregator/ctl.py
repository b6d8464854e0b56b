"""``aggregatorctl``: ask a running aggregator how it is doing, watch it live, tail a topic,
rotate, reload, make CURVE keys.

The connection is aggregator/ctl_client.py, the status and top views aggregator/ctl_views.py,
`tail` aggregator/ctl_tail.py; the command line and the small commands are here."""

from __future__ import annotations

import argparse
import sys

import zmq

from aggregator.config import load_config
from aggregator.ctl_client import (
    EXIT_FELL_BEHIND,
    EXIT_UNREACHABLE,
    Client,
    CommandFailed,
    Unreachable,
    local_endpoint,
)
from aggregator.ctl_tail import cmd_tail
from aggregator.ctl_views import cmd_status, cmd_top, render_status, render_top
from fleetlog import __version__, curve
from fleetlog.cli import die_quietly_on_closed_pipe, nothing_listens
from fleetlog.tomlconf import ConfigError, endpoint_problem

# What other modules and tests import from here.
__all__ = ["EXIT_FELL_BEHIND", "EXIT_UNREACHABLE", "Client", "CommandFailed", "Unreachable", "local_endpoint",
           "main", "render_status", "render_top"]


def find_control(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    config = load_config(args.config, check_dirs=False)
    endpoints = config.aggregator.control
    ipc = [e for e in endpoints if e.startswith("ipc://")]
    return local_endpoint(ipc[0] if ipc else endpoints[0])


def cmd_rotate(client: Client, args: argparse.Namespace) -> int:
    result = client.call("rotate", **({"topic": args.topic} if args.topic else {}))
    for name in result["rotated"]:
        # Compression runs after the reply: until it ends, `ls` shows the name without .gz.
        print(f"rotated to {name}" + (" (compressing)" if name.endswith(".gz") else ""))
    if not result["rotated"]:
        print("nothing to rotate (empty active files)")
    return 0


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    result = client.call("reload")
    if not result["reloaded"]:
        for problem in result["problems"]:
            print(f"aggregatorctl: reload refused: {problem}", file=sys.stderr)
        return 1
    print("reloaded" + (f"; restart needed for {', '.join(result['restart_needed'])}"
                        if result["restart_needed"] else ""))
    return 0


def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    pong = client.call("ping")
    print(f"aggregator {pong['instance']} (fleetlog {pong.get('version', '?')}) at {client.endpoint}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="aggregatorctl",
        description="Ask a running fleetlog aggregator how it is doing, follow a topic live, rotate "
                    "its files, reload its config, or make CURVE keys.",
        epilog="The aggregator is found from --control, else from --config (its ipc:// control "
               "socket if it has one), else from /etc/fleetlog/aggregator.toml, else "
               "tcp://127.0.0.1:5558. Exit status: 0 ok, 1 the command failed, 2 bad usage or "
               "config, 3 no aggregator answered. Examples: aggregatorctl status; aggregatorctl "
               "status --json | jq .totals; aggregatorctl tail nginx; aggregatorctl rotate nginx; "
               "aggregatorctl keygen web-01 --dir /etc/fleetlog/keys")
    p.add_argument("--version", action="version", version=f"aggregatorctl (fleetlog) {__version__}")
    p.add_argument("--control", metavar="ENDPOINT",
                   help="the aggregator's control endpoint, e.g. tcp://logs.example:5558 or "
                        "ipc:///run/fleetlog/control.sock")
    p.add_argument("--config", metavar="PATH", help="find the control endpoint in this aggregator config")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                   help="how long to wait for an answer (default 3)")
    p.add_argument("--curve-key", metavar="FILE", help="this client's secret key file (CURVE over tcp)")
    p.add_argument("--server-key", metavar="KEY", help="the aggregator's public key (z85 or .key file)")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="write a CURVE key pair NAME.key and NAME.key_secret (0600)")
    k.add_argument("name")
    k.add_argument("--dir", default=".", help="where to write them (default: here)")
    k.set_defaults(func=None)
    s = sub.add_parser("status", help="agents, topics, totals")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_status)
    top = sub.add_parser("top", help="live view of rates and lag, redrawn every --interval seconds")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="default 1")
    top.add_argument("--iterations", type=int, default=None, metavar="N", help="stop after N screens")
    top.set_defaults(func=cmd_top)
    t = sub.add_parser(
        "tail", help="print a topic's last lines, then its new lines as they come",
        description="Print the last N lines of TOPIC's output (its active file, then its rotated "
                    "files, compressed or not, if the active one holds fewer), read by the "
                    "aggregator, then follow its new lines live, like tail -n N -f.",
        epilog="The seam between the last lines and the live ones is exact: none missing, none "
               "twice, unless tail falls behind (see --lossy). Lines of a json topic are shown "
               "as the agents wrote them, as are the live ones.")
    t.add_argument("topic")
    t.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                   help="print the last N lines first (default 10; 0: only new lines)")
    t.add_argument("--count", type=int, default=None, metavar="N",
                   help="exit after N new lines (not counting the last lines of -n)")
    t.add_argument("--wait", action="store_true", help="a topic that has no line yet: wait for it")
    t.add_argument("--lossy", action="store_true",
                   help="when it falls behind (lines dropped), say so and go on instead of exiting 4")
    t.set_defaults(func=cmd_tail)
    r = sub.add_parser("rotate", help="roll a topic's file (or all) over now")
    r.add_argument("topic", nargs="?")
    r.set_defaults(func=cmd_rotate)
    sub.add_parser("reload", help="reload the aggregator's config").set_defaults(func=cmd_reload)
    sub.add_parser("ping", help="is it there").set_defaults(func=cmd_ping)
    return p.parse_args(argv)


def keygen(name: str, directory: str) -> int:
    if not name or "/" in name or name.startswith("."):
        print(f"aggregatorctl: {name!r} is not a usable key name", file=sys.stderr)
        return 2
    try:
        public, secret = curve.generate(directory, name)
    except (curve.KeyError_, OSError) as exc:
        print(f"aggregatorctl: {exc}", file=sys.stderr)
        return 1
    print(f"public key  {public}")
    print(f"secret key  {secret}  (mode 0600: it never leaves this host)")
    print("Where they go, depending on whose key this is:")
    print(f"  an agent's key:       {public} into the aggregator's authorized_keys_dir;")
    print(f"                        agent.curve_secret_key = \"{secret}\" on the agent")
    print(f"  the aggregator's key: aggregator.curve_secret_key = \"{secret}\";")
    print(f"                        agent.curve_server_key = \"{public}\" on every agent")
    print(f"  an admin's key:       {public} into the aggregator's admin_keys_dir;")
    print(f"                        aggregatorctl --curve-key {secret} --server-key AGGREGATOR.key")
    return 0


def main(argv: list[str] | None = None) -> int:
    die_quietly_on_closed_pipe()
    args = parse_args(argv)
    if args.command == "keygen":
        return keygen(args.name, args.dir)
    try:
        endpoint = find_control(args)
        if (problem := endpoint_problem(endpoint)) is not None:
            print(f"aggregatorctl: --control: {problem}", file=sys.stderr)
            return 2
        keys = None
        if args.curve_key or args.server_key:
            if not (args.curve_key and args.server_key):
                print("aggregatorctl: --curve-key and --server-key go together", file=sys.stderr)
                return 2
            keys = (curve.load_secret(args.curve_key), curve.load_public(args.server_key))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"aggregatorctl: config: {problem}", file=sys.stderr)
        return 2
    except curve.KeyError_ as exc:
        print(f"aggregatorctl: {exc}", file=sys.stderr)
        return 2
    if (absent := nothing_listens(endpoint)) is not None:
        print(f"aggregatorctl: no aggregator at {endpoint}: {absent}; is it running?", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        client = Client(endpoint, args.timeout, keys)
    except zmq.ZMQError as exc:
        print(f"aggregatorctl: cannot connect to {endpoint}: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(client, args))
    except Unreachable as exc:
        print(f"aggregatorctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandFailed as exc:
        print(f"aggregatorctl: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())

