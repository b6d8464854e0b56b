"""The tailer on real files: what one read ships, byte for byte and line for line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import SourceConfig
from agent.tail import FP_LEN, Tailer, fingerprint, line_start_before


def tailer(path: Path, **source: object) -> Tailer:
    src = SourceConfig(paths=(str(path),), topic="t", **source)  # type: ignore[arg-type]
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    fp, n = fingerprint(fd)
    t = Tailer(source=src, path=str(path), stream="s", dev=st.st_dev, ino=st.st_ino, fp=fp, fp_len=n,
               base=0, acked=0)
    t.fd = fd
    return t


def ship(t: Tailer, now: float = 0.0, max_bytes: int = 1 << 20, max_lines: int = 10_000) -> list[str]:
    """Read everything there is, as the daemon would, and return the lines."""
    lines: list[str] = []
    while (chunk := t.read(max_bytes, max_lines, now)) is not None:
        assert chunk.start == t.ship_pos
        t.ship_pos = chunk.end
        lines += chunk.line_list()
        if chunk.start == chunk.end:
            break
    return lines


def test_partial_last_line_is_held_until_its_newline(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"one\ntwo\nthr")
    t = tailer(p)
    assert ship(t) == ["one", "two"]
    assert t.ship_pos == 8
    with open(p, "ab") as fh:
        fh.write(b"ee\n")
    assert ship(t, now=1.0) == ["three"]
    t.close()


def test_partial_line_ships_after_its_timeout(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"complete\nno newline yet")
    t = tailer(p, partial_line_timeout_ms=500)
    assert ship(t, now=10.0) == ["complete"]
    assert ship(t, now=10.2) == []
    assert ship(t, now=10.6) == ["no newline yet"]
    assert t.ship_pos == p.stat().st_size
    t.close()


def test_crlf_empty_lines_nul_and_invalid_utf8_keep_the_line_count(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"dos\r\n\n\nnul\x00byte\nbad \xff\xfe utf8\nok \xc3\xa9\n")
    t = tailer(p)
    lines = ship(t)
    assert lines == ["dos\r", "", "", "nul\x00byte", "bad \ufffd\ufffd utf8", "ok é"]
    assert t.ship_pos == p.stat().st_size
    t.close()


def test_over_long_line_is_cut_and_the_file_goes_on(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"before\n" + b"x" * 5000 + b"\nafter\n")
    t = tailer(p, max_line_bytes=1000)
    lines = ship(t, max_bytes=1024)
    assert lines == ["before", "x" * 1000, "after"]
    assert t.cut_lines == 1 and t.discarded_bytes == 4000
    assert t.ship_pos == p.stat().st_size
    t.close()


def test_over_long_line_inside_a_batch_is_cut(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"a\n" + b"y" * 3000 + b"\nb\n")
    t = tailer(p, max_line_bytes=1000)
    assert ship(t) == ["a", "y" * 1000, "b"]
    t.close()


def test_batches_respect_max_lines(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"".join(b"%d\n" % i for i in range(25)))
    t = tailer(p)
    chunk = t.read(1 << 20, 10, 0.0)
    assert chunk is not None and chunk.line_list() == [str(i) for i in range(10)]
    assert chunk.end == len(b"".join(b"%d\n" % i for i in range(10)))
    t.close()


def test_multiline_records_are_joined_and_the_last_held(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"2024 ERROR boom\n  at a()\n  at b()\n2024 INFO next\n  cont\n")
    t = tailer(p, multiline_start=r"^\d{4} ", multiline_timeout_ms=1000)
    assert ship(t, now=0.0) == ["2024 ERROR boom\n  at a()\n  at b()"]
    assert ship(t, now=0.5) == []
    assert ship(t, now=1.6) == ["2024 INFO next\n  cont"]
    assert t.ship_pos == p.stat().st_size
    t.close()


def test_start_at_end_begins_after_the_last_complete_line(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"old\nolder\npartial")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert line_start_before(fd, p.stat().st_size) == len(b"old\nolder\n")
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [10, FP_LEN, FP_LEN * 3])
def test_fingerprint_covers_at_most_fp_len_bytes(tmp_path: Path, size: int) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"z" * size)
    fd = os.open(p, os.O_RDONLY)
    try:
        fp, n = fingerprint(fd)
        assert n == min(size, FP_LEN)
        with open(p, "ab") as fh:
            fh.write(b"more")
        assert fingerprint(fd, n)[0] == fp
    finally:
        os.close(fd)


def test_a_read_takes_the_size_its_change_saw_and_the_next_read_looks_again(tmp_path: Path) -> None:
    """The size a change event saw serves the one read it queued (no second fstat); bytes
    written after that are read by the next read, which looks at the file again."""
    p = tmp_path / "a.log"
    p.write_bytes(b"one\n")
    t = tailer(p)
    t.size, t.size_seen = 4, True  # what the change event's fstat saw
    with open(p, "ab") as fh:
        fh.write(b"two\n")  # after it was seen (its own event queues the next read)
    chunk = t.read(1 << 20, 10_000, 0.0)
    assert chunk is not None and chunk.line_list() == ["one"]
    t.ship_pos = chunk.end
    assert not t.size_seen
    assert ship(t) == ["two"]
    assert t.size == 8
    t.close()
