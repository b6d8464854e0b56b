"""What every stage of the aggregator may use: the state ``Aggregator.__init__`` sets up and the
methods one stage calls on another.

The aggregator is one object assembled from one mixin per stage a batch goes through
(aggregator/daemon.py): ingest (ingest.py) → per-stream acceptance (acceptance.py) → the sink
→ group commit and acknowledgement (commit.py); beside them flow control (flow.py), the agents
(agents.py), held topics and disk probing (holds.py), rolling the files over (rolling.py) and
status (status.py). The declarations below exist only for the type checker: at run time each name
is the attribute or method of the stage that owns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures
    import threading
    from collections.abc import Callable

    import zmq
    import zmq.asyncio

    from aggregator import metrics
    from aggregator.agents import AgentInfo
    from aggregator.config import AggregatorConfig, Config
    from aggregator.control import ControlServer
    from aggregator.files import Hold, RollingFileSink, SinkError
    from aggregator.jetstream import JetStreamSink
    from aggregator.journal import Journal
    from aggregator.security import Guard
    from aggregator.sink import Sink
    from aggregator.status import TopicStats, Totals
    from fleetlog import wire
    from fleetlog.runtime import SystemdNotifier, Wakeup


class Stages:
    if TYPE_CHECKING:
        config: Config
        cfg: AggregatorConfig
        clock: Callable[[], float]
        instance: str
        started: float
        started_wall: float
        ctx: zmq.asyncio.Context | None
        sink: RollingFileSink
        stream_sink: JetStreamSink | None
        out: Sink  # where ingest hands accepted batches: ``sink`` or ``stream_sink``
        journal: Journal
        notifier: SystemdNotifier
        guard: Guard
        agents: dict[str, AgentInfo]
        topics: dict[str, TopicStats]
        totals: Totals
        accepted: dict[str, int]
        pending: dict[str, int]
        pending_bytes: int
        uncommitted_bytes: dict[str, int]
        commit_soon: bool
        owed_acks: dict[str, dict[str, int]]
        catching_up: int
        window: int | None
        granted: int
        disk_error: str | None
        state_error: Hold | None
        refusing: bool
        refused: dict[str, tuple[str, str, int | None, str, int]]
        stream_topic: dict[str, str]
        descriptors_short_at: float | None
        _holds_unlogged: int
        commit_wake: Wakeup
        commit_idle: bool
        readable: dict[str, Wakeup]
        stopping: asyncio.Event
        _warned_peers: set[tuple[str, str]]
        _registry_error: bool
        _compressions: set[asyncio.Future[Any]]
        _compressor: concurrent.futures.ThreadPoolExecutor
        _compress_cancel: threading.Event
        sockets: dict[str, zmq.asyncio.Socket]
        control: ControlServer | None
        subscriptions: set[bytes]
        commit_lock: asyncio.Lock
        commit_latency: metrics.LatencyHistogram
        loop_stall_max_s: float
        loop_stall_windows: list[float]
        _stall_window_end: float

        # One stage's methods that another calls.
        def send_event(self, agent: str, body: bytes) -> None: ...
        def grant(self, info: AgentInfo) -> int | None: ...
        def share_window(self) -> None: ...
        def agent_warnings(self, info: AgentInfo) -> list[str]: ...
        def save_registry(self) -> None: ...
        def save_registry_later(self) -> asyncio.Future[None]: ...
        def refuse(self, batch: wire.Batch) -> bool: ...
        def admit(self, batch: wire.Batch, key: str, file_key: str) -> int | None: ...
        def file_key(self, batch: wire.Batch) -> str: ...
        def resync_refused(self) -> None: ...
        def take_back(self, topic: str, *windows: dict[str, int]) -> None: ...
        def forget_old_streams(self) -> None: ...
        def on_write_error(self, topic: str, exc: SinkError, need_bytes: int) -> None: ...
        def hold_topic(self, topic: str, exc: OSError, need_bytes: int = 0) -> None: ...
        def release_topic(self, topic: str) -> None: ...
        def on_state_error(self, exc: OSError) -> None: ...
        def show_disk_error(self) -> None: ...
        def on_disk_error(self, exc: SinkError) -> None: ...
        def finish_rotations(self) -> None: ...
        def probe_disk(self) -> None: ...
        def owe_ack(self, agent: str, stream: str, end: int) -> None: ...
        def note_stall(self, late_s: float) -> None: ...
        def poke_commit(self) -> None: ...
        def rotation_due(self) -> bool: ...
        async def commit(self) -> None: ...
        async def rotate_due(self, force: set[str | None] | None = None) -> list[str]: ...
        def recover_rotations(self, rotations: dict[str, Any]) -> None: ...
        def _retain_later(self, topics: list[str] | None) -> None: ...
        def status_line(self) -> str: ...
        def malformed(self, reason: str, peer: str, detail: str = "") -> None: ...
