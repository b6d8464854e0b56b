"""Optional profiling of the daemons during the benchmark with py-spy (``pip install py-spy``).

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``); ``summarize``
turns them into the functions with the most samples, on their own (self) and with their callees
(total), as a share of the samples in which the process was running Python code.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections import Counter

from bench.procs import Proc


def find() -> str | None:
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return local if os.path.exists(local) else shutil.which("py-spy")


def record(exe: str, target: Proc, out_dir: str, rate_hz: int = 250) -> Proc:
    out = os.path.join(out_dir, f"{target.name}.collapsed.txt")
    argv = [exe, "record", "--nonblocking", "--format", "raw", "--rate", str(rate_hz), "--output", out,
            "--pid", str(target.pid)]
    return Proc(f"py-spy-{target.name}", argv, out_dir).start()


def finish(recorder: Proc) -> None:
    """py-spy writes its output when interrupted."""
    recorder.stop(signal.SIGINT, timeout_s=30)


def _frame_name(frame: str) -> str:
    # "read_loop (agent/daemon.py:432)" -> "read_loop (agent/daemon.py)": one entry per function.
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({os.path.basename(os.path.dirname(path))}/{os.path.basename(path)})"


def summarize(path: str, top: int = 15) -> str:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            frames = [_frame_name(f) for f in stack.split(";")]
            samples += count
            self_counts[frames[-1]] += count
            for name in set(frames):
                total_counts[name] += count
    if not samples:
        return f"{path}: no samples"
    out = [f"{os.path.basename(path)}: {samples} samples",
           f"  {'self %':>7}  {'total %':>7}  function"]
    for name, count in self_counts.most_common(top):
        out.append(f"  {100 * count / samples:7.1f}  {100 * total_counts[name] / samples:7.1f}  {name}")
    out.append("  (by total)")
    for name, count in total_counts.most_common(top):
        out.append(f"  {100 * self_counts[name] / samples:7.1f}  {100 * count / samples:7.1f}  {name}")
    return "\n".join(out)
