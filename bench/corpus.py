"""The benchmark's input and its check: realistic log lines with a unique id each, and a verifier.

Every line is 80 to 300 bytes of UTF-8 and carries ``id=<file>-<n>`` (file index, line number from
0), so the output can be checked: each id exactly once, each file's lines in order, and each file's
lines byte-identical to the source. Generation is deterministic for a given seed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import re
import time
from dataclasses import dataclass, field

MIN_BYTES, MAX_BYTES = 80, 300
ID_RE = re.compile(rb"\bid=(\d+)-(\d+)\b")

_WORDS = ("request", "handled", "user", "session", "cache", "miss", "hit", "token", "refresh", "upstream",
          "timeout", "retry", "connection", "reset", "by", "peer", "queue", "depth", "worker", "started",
          "finished", "order", "payment", "settled", "declined", "invoice", "account", "quota", "exceeded",
          "disk", "latency", "slow", "query", "rows", "scanned", "shard", "replica", "lag", "leader",
          "elected", "config", "reloaded", "certificate", "expires", "soon", "GC", "pause", "heap", "ok")
_UNICODE = ("café", "naïve", "Größe", "über", "日本語のログ", "東京", "данные", "ошибка", "señal", "😀",
            "→", "€42", "Ωmega", "παράδειγμα", "ünïcödé", "中文字符", "✓", "…")
_METHODS = ("GET",) * 7 + ("POST",) * 2 + ("PUT", "DELETE", "HEAD")
_STATUS = (200,) * 12 + (201, 204, 301, 304, 400, 401, 403, 404, 404, 429, 500, 502, 503)
_PATHS = ("/", "/index.html", "/api/v1/users", "/api/v1/orders", "/api/v2/search", "/static/app.js",
          "/static/css/main.css", "/healthz", "/login", "/cart/checkout", "/img/logo.png", "/feed.xml")
_AGENTS = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0",
           "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
           "curl/8.4.0", "Go-http-client/1.1", "python-requests/2.31.0", "Prometheus/2.48.0",
           "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0")
_REFERERS = ("-", "-", "https://example.com/", "https://shop.example.com/cart", "https://www.google.com/")
_APPS = ("billing", "auth", "api", "worker", "scheduler", "mailer", "search", "gateway")
_HOSTS = tuple(f"web-{i:02d}" for i in range(1, 13))
_LEVELS = ("INFO",) * 6 + ("DEBUG", "DEBUG", "WARN", "ERROR")


def _words(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(_WORDS, k=rng.randint(lo, hi))
    if rng.random() < 0.08:
        words[rng.randrange(len(words))] = rng.choice(_UNICODE)
    return " ".join(words)


def _nginx(rng: random.Random, ts: tuple[str, str], ident: str) -> tuple[str, str, str]:
    ip = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    path = rng.choice(_PATHS)
    if rng.random() < 0.4:
        path += f"?page={rng.randint(1, 50)}&q={rng.choice(_WORDS)}"
    ua = rng.choice(_AGENTS)
    if rng.random() < 0.03:
        ua += " " + rng.choice(_UNICODE)
    pre = (f'{ip} - - [{ts[1]}] "{rng.choice(_METHODS)} {path} HTTP/1.1" {rng.choice(_STATUS)} '
           f'{rng.randint(0, 90000)} "{rng.choice(_REFERERS)}" "')
    return pre, ua, f'" rt={rng.random():.3f} {ident}'


def _syslog(rng: random.Random, ts: tuple[str, str], ident: str) -> tuple[str, str, str]:
    pre = (f"{ts[0]} {rng.choice(_HOSTS)} {rng.choice(_APPS)}[{rng.randint(100, 32000)}]: "
           f"{rng.choice(_LEVELS)} ")
    return pre, _words(rng, 6, 30), f" {ident} took={rng.randint(0, 5000)}ms"


def _jsonish(rng: random.Random, ts: tuple[str, str], ident: str) -> tuple[str, str, str]:
    pre = f'{{"ts":"{ts[0]}","level":"{rng.choice(_LEVELS).lower()}","svc":"{rng.choice(_APPS)}","msg":"'
    msg = _words(rng, 4, 22)
    if rng.random() < 0.2:
        msg += ' \\"quoted\\" detail'
    post = f'","user_id":{rng.randint(1, 10**6)},"ref":"{ident}","latency_ms":{rng.randint(0, 900)}}}'
    return pre, msg, post


def make_line(rng: random.Random, ts: tuple[str, str], ident: str) -> str:
    """One line; ``ts`` is the time as ISO 8601 and in nginx's common log format."""
    r = rng.random()
    maker = _nginx if r < 0.45 else _syslog if r < 0.8 else _jsonish
    pre, mid, post = maker(rng, ts, ident)
    line = pre + mid + post
    size = len(line.encode()) if not line.isascii() else len(line)
    while size > MAX_BYTES and mid:
        mid = mid[: max(0, len(mid) - (size - MAX_BYTES))]
        line = pre + mid + post
        size = len(line.encode())
    if size < MIN_BYTES:
        line = pre + mid + " pad=" + "x" * (MIN_BYTES - size) + post
    return line


def generate_file(path: str, index: int, lines: int, seed: int) -> int:
    """Write ``lines`` lines for file ``index``; return its size in bytes."""
    rng = random.Random(seed * 1_000_003 + index)
    epoch = 1_700_000_000 + index * 7
    out: list[str] = []
    written = 0
    with open(path, "wb") as fh:
        for n in range(lines):
            sec = epoch + n // 40
            if n % 40 == 0:
                tm = time.gmtime(sec)
                iso = time.strftime("%Y-%m-%dT%H:%M:%S", tm)
                clf = time.strftime("%d/%b/%Y:%H:%M:%S +0000", tm)
            ts = (f"{iso}.{n * 25 % 1000:03d}Z", clf)
            out.append(make_line(rng, ts, f"id={index}-{n}"))
            if len(out) >= 20_000:
                written += fh.write(("\n".join(out) + "\n").encode())
                out.clear()
        if out:
            written += fh.write(("\n".join(out) + "\n").encode())
    return written


def generate(directory: str, files: int, lines_per_file: int, seed: int = 1) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"f{i}.log") for i in range(files)]
    for i, path in enumerate(paths):
        generate_file(path, i, lines_per_file, seed)
    return paths


@dataclass
class Verdict:
    lines: int = 0
    expected: int = 0
    missing: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    foreign: int = 0           # lines without a known id
    files_identical: int = 0   # source files whose lines arrived byte-identical, in order
    files: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.missing == self.duplicated == self.out_of_order == self.foreign == 0
                and self.files_identical == self.files and self.lines == self.expected)


def _read_output(paths: list[str]) -> bytes:
    parts = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            parts.append(fh.read())
    return b"".join(parts)


def output_files(topic_dir: str, topic: str) -> list[str]:
    """A topic's files oldest first: rotated ones (timestamped names sort by time), then the active one."""
    try:
        names = os.listdir(topic_dir)
    except FileNotFoundError:
        return []
    active = f"{topic}.log"
    rotated = sorted(n for n in names if n.startswith(f"{topic}.") and n != active
                     and (n.endswith(".log") or n.endswith(".log.gz")))
    return [os.path.join(topic_dir, n) for n in rotated + ([active] if active in names else [])]


def verify(output: list[str], sources: list[str], lines_per_file: int) -> Verdict:
    """Each id exactly once, in per-file order, and each file's lines identical to its source."""
    files = len(sources)
    v = Verdict(expected=files * lines_per_file, files=files)
    seen = [bytearray(lines_per_file) for _ in range(files)]
    last = [-1] * files
    hashers = [hashlib.blake2b(digest_size=16) for _ in range(files)]
    data = _read_output(output)
    if data and not data.endswith(b"\n"):
        v.notes.append("output does not end with a newline")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    v.lines = len(lines)
    search = ID_RE.search
    for line in lines:
        m = search(line)
        if m is None:
            v.foreign += 1
            continue
        f, n = int(m[1]), int(m[2])
        if f >= files or n >= lines_per_file:
            v.foreign += 1
            continue
        mark = seen[f]
        if mark[n]:
            v.duplicated += 1
            continue
        mark[n] = 1
        if n < last[f]:
            v.out_of_order += 1
        last[f] = n
        hashers[f].update(line)
        hashers[f].update(b"\n")
    for f, path in enumerate(sources):
        v.missing += lines_per_file - seen[f].count(1)
        with open(path, "rb") as fh:
            if hashlib.blake2b(fh.read(), digest_size=16).digest() == hashers[f].digest():
                v.files_identical += 1
    return v
