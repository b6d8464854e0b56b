"""The wire format and the commit journal: pure parts, and the decoder under fuzzing."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from aggregator.journal import Journal
from fleetlog import wire


def sample(**changes: object) -> wire.Batch:
    fields = {"topic": "nginx", "agent": "web-01", "stream": "abc", "base": 0, "path": "/var/log/x.log",
              "file": "1:2:ff", "seq": 3, "start": 10, "end": 30, "lines": ["é one", "two\x00", ""]}
    fields.update(changes)
    return wire.Batch(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("lines, version", [(["é one", "two\x00", ""], 1), ("é one\ntwo\x00\n\n", 2)])
def test_round_trip_keeps_every_field(lines: list[str] | str, version: int) -> None:
    batch = sample(lines=lines)
    frames = wire.encode_batch(batch)
    assert frames[0] == b"nginx"
    assert wire.decode_batch(frames) == batch
    assert orjson.loads(frames[1])["v"] == version
    assert batch.count == 3 and batch.line_list() == ["é one", "two\x00", ""]


@pytest.mark.parametrize("text", ["no newline at the end", 5, None, ["a list"]])
def test_version_2_text_must_be_lines_ending_in_newlines(text: object) -> None:
    body = orjson.loads(wire.encode_batch(sample(lines="a\n"))[1])
    body["text"] = text
    with pytest.raises(wire.WireError):
        wire.decode_batch([b"nginx", orjson.dumps(body)])


@pytest.mark.parametrize("topic, ok", [
    ("nginx", True), ("a.b-c_d", True), ("x" * 128, True), ("x" * 129, False), (".hidden", False),
    ("..", False), ("a/b", False), ("", False), ("é", False), ("a b", False),
])
def test_topic_alphabet(topic: str, ok: bool) -> None:
    assert wire.valid_topic(topic) is ok


SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
           | st.text())
JSONISH = st.recursive(SCALARS,
                       lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
                       max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(topic=st.binary(max_size=140), body=st.binary(max_size=400))
def test_decoder_never_crashes_on_bytes(topic: bytes, body: bytes) -> None:
    try:
        batch = wire.decode_batch([topic, body])
    except wire.WireError:
        return
    assert wire.valid_topic(batch.topic)


@settings(max_examples=300, deadline=None)
@given(topic=st.sampled_from([b"ok", b"../etc", b"a/b", b".x", b"good.topic"]),
       doc=st.fixed_dictionaries({}, optional={k: JSONISH for k in (
           "v", "agent", "stream", "base", "path", "file", "seq", "start", "end", "lines", "text")}),
       version=st.sampled_from([1, 1, 2, None]))
def test_decoded_batches_are_safe_to_write(topic: bytes, doc: dict[str, object], version: object) -> None:
    if version is not None:
        doc["v"] = version
    try:
        batch = wire.decode_batch([topic, orjson.dumps(doc)])
    except wire.WireError:
        return
    out = Path("/srv/out")
    target = (out / batch.topic / f"{batch.topic}.log").resolve()
    assert target.is_relative_to(out) and target.parent.parent == out
    assert 0 <= batch.base <= batch.start <= batch.end
    if type(batch.lines) is str:  # version 2: lines that each end in a newline
        assert batch.lines == "" or batch.lines.endswith("\n")
        assert batch.count == len(batch.line_list())


# Values at and beside each limit the decoder checks, valid or not, for every field.
_NAMES = st.sampled_from(["", "a", "web-01", "x" * 256, "x" * 257, 7, None, ["a"]])
_OFFSETS = st.sampled_from([0, 1, 10, 30, 2**53, -1, True, 1.5, "3", None])
_EDGES = {
    "v": st.sampled_from([2, 2, 2, 1, 3, 2.0, True, "2", None]),
    "text": st.sampled_from(["", "a\n", "a\nb\n", "no newline", "a\n" * 3, 5, None, ["a"]]),
    "lines": st.sampled_from([["a"], [], "a\n", None]),
    "agent": _NAMES, "stream": _NAMES,
    "base": _OFFSETS, "seq": _OFFSETS, "start": _OFFSETS, "end": _OFFSETS,
    "path": st.sampled_from(["", "/var/log/x.log", "p" * 4096, "p" * 4097, 5, None]),
    "file": st.sampled_from(["", "1:2:ff", "f" * 256, "f" * 257, 5, None]),
    "fields": st.sampled_from([None, [], [{"a": 1}], "x"]),
}


_VALID = {"v": 2, "text": "a\nb\n", "agent": "web-01", "stream": "abc", "base": 0, "seq": 3,
          "start": 10, "end": 30, "path": "/var/log/x.log", "file": "1:2:ff"}


@st.composite
def _bodies(draw: st.DrawFn) -> dict[str, object]:
    """A well-formed version 2 body with up to three fields changed to a value at or beside a
    limit, or left out."""
    doc: dict[str, object] = dict(_VALID)
    for key in draw(st.lists(st.sampled_from(sorted(_EDGES)), max_size=3, unique=True)):
        if draw(st.booleans()) and key in doc:
            del doc[key]
        else:
            doc[key] = draw(_EDGES[key])
    return doc


@settings(max_examples=1500, deadline=None)
@given(doc=_bodies())
def test_the_fast_decoder_takes_exactly_what_the_checked_one_takes(doc: dict[str, object]) -> None:
    """``wire._batch`` reads a well-formed body in one pass and leaves anything else to
    ``_batch_checked``: wherever it accepts a body, the checked path must accept it too and
    make the same batch (and they refuse the same bodies for the same reason)."""
    def outcome(decode: object) -> object:
        try:
            return decode("app", doc)  # type: ignore[operator]
        except wire.WireError as exc:
            return exc.reason
    fast = outcome(wire._batch)
    assert fast == outcome(wire._batch_checked)
    event("accepted" if isinstance(fast, wire.Batch) else "refused")


def test_version_3_carries_several_streams_batches_in_order() -> None:
    one = sample(stream="s1", lines="a\nb\n")
    two = sample(stream="s2", lines=["c"], start=0, end=2)
    frames = wire.multi_frames(b"nginx", [wire.encode_batch(one)[1], wire.encode_batch(two)[1]])
    assert orjson.loads(frames[1])["v"] == 3
    assert wire.decode_batches(frames) == [one, two]
    assert wire.decode_batches(wire.encode_batch(one)) == [one]  # older versions: one batch
    with pytest.raises(wire.WireError):
        wire.decode_batch(frames)  # the one-batch reader refuses it rather than misreading it


@pytest.mark.parametrize("batches", [
    None, [], "x", [5], [{"v": 3, "batches": []}],
    # one good batch and one bad one: the whole message is dropped
    "good+bad-offsets", "good+no-stream", "good+bad-text",
])
def test_malformed_version_3_messages_are_refused_whole(batches: object) -> None:
    good = orjson.loads(wire.encode_batch(sample(lines="a\n"))[1])
    if batches == "good+bad-offsets":
        batches = [good, {**good, "start": 50, "end": 40}]
    elif batches == "good+no-stream":
        batches = [good, {k: v for k, v in good.items() if k != "stream"}]
    elif batches == "good+bad-text":
        batches = [good, {**good, "text": "no newline"}]
    with pytest.raises(wire.WireError):
        wire.decode_batches([b"nginx", orjson.dumps({"v": 3, "batches": batches})])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.fixed_dictionaries({}, optional={k: JSONISH for k in (
    "v", "agent", "stream", "base", "path", "file", "seq", "start", "end", "lines", "text")}), max_size=4))
def test_version_3_decoder_never_crashes(parts: list[dict[str, object]]) -> None:
    try:
        batches = wire.decode_batches([b"ok", orjson.dumps({"v": 3, "batches": parts})])
    except wire.WireError:
        return
    assert batches and all(0 <= b.base <= b.start <= b.end for b in batches)


def test_journal_survives_a_torn_tail(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    j.recover()
    j.append({"t": 100}, {"a\x1fs": 100})
    j.append({"t": 250}, {"a\x1fs": 250, "b\x1fs": 7})
    j.close()
    with open(tmp_path / "journal.bin", "ab") as fh:
        fh.write(b"\x50\x00\x00\x00garbage-from-a-crash")
    j2 = Journal(str(tmp_path))
    state = j2.recover()
    assert state.topics == {"t": 250}
    assert {k: v[0] for k, v in state.streams.items()} == {"a\x1fs": 250, "b\x1fs": 7}
    j2.append({"t": 300}, {})
    j2.close()
    assert Journal(str(tmp_path)).recover().topics == {"t": 300}


def test_journal_compaction_keeps_the_state(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), compact_bytes=2000)
    j.recover()
    for i in range(100):
        j.append({"t": i}, {f"a\x1f{i % 7}": i})
    j.close()
    assert os.path.getsize(tmp_path / "journal.bin") < 2000
    state = Journal(str(tmp_path)).recover()
    assert state.topics == {"t": 99} and state.streams["a\x1f1"][0] == 99 and state.seq == 100


def test_idle_streams_are_forgotten_at_compaction(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), stream_ttl_s=3600)
    j.recover()
    j.append({}, {"a\x1fold": 10, "a\x1fnew": 20})
    j.state.streams["a\x1fold"][1] -= 7200  # last committed two hours ago
    j.compact(j.stream_ttl_s)
    j.close()
    assert set(Journal(str(tmp_path)).recover().streams) == {"a\x1fnew"}
