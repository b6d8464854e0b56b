"""fleetlog agent: follows log files on a node and ships their lines to the aggregator.

The agent runs on every node, so what it maps stays small (issue 18: an idle agent at most 20 MB
RSS). It never speaks TLS (ZeroMQ brings its own CURVE crypto) and hashes only short strings, yet
``import asyncio`` imports ``ssl`` and ``import hashlib`` imports ``_hashlib``, and both load
OpenSSL's libcrypto: about 5 MiB of an idle agent's RSS (31.0 -> 26.3 MiB measured with 8 quiet
files on the stdlib loop). So the first import of the ``agent`` package imports those two with
``ssl`` and ``_hashlib`` hidden: asyncio then keeps ``ssl = None`` (only its TLS transports use
it) and hashlib its built-in sha256 and blake2b (the same digests). Both are visible again
afterwards, so whatever needs ssl later (prometheus-client with ``metrics_listen`` set, uvloop with
``loop = "uvloop"``) imports it as usual. In a process that imported them already (tests, tools),
this does nothing.
"""

from __future__ import annotations

import sys


def _import_without_openssl() -> None:
    hidden = [name for name in ("ssl", "_hashlib") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # "import ssl" raises ImportError
    try:
        import asyncio  # noqa: F401
        import hashlib  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


_import_without_openssl()
