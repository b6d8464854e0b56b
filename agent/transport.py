"""Talking to the aggregator: the data socket (PUSH or PUB) and the control DEALER.

The control channel carries hello (on start and whenever the aggregator's instance id
changes, i.e. it restarted), heartbeats with this agent's lag, and the aggregator's events:
``ack`` (these streams are durable up to these offsets), ``resync`` (this stream continues at
this offset; ship from there) and ``stopping`` (it is going down: move to another one now).

With several aggregators configured, one is used at a time (agent/failover.py chooses). A move
closes both sockets, with whatever their queues hold, and opens new ones to the next: no batch
sent before the move can reach the old aggregator after it, so a stream's batches never go to
two aggregators at once. The agent then behaves as after an aggregator restart: hello, and
everything not acknowledged shipped again from the acknowledged offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.asyncio

from agent.config import AgentConfig, AggregatorEndpoints
from agent.failover import Failover, Switch
from agent.link import REFUSED_GRACE_S, Link
from fleetlog import curve, wire
from fleetlog.runtime import Wakeup

log = logging.getLogger("fleetlog.agent.transport")

_MORE_NOW = int(zmq.SNDMORE | zmq.NOBLOCK)
_NOW = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)

# Messages queued in ZeroMQ per connection. The data socket queues only on a live connection
# (IMMEDIATE): with the aggregator down a send waits instead of piling up batches. PUSH waits
# for room at its high-water mark: 32 lets a burst of 32 files' batches go out without waiting
# (with 8, a tenth of the sends of 8 busy files waited, through a pyzmq future) and keeps a
# catch-up's queue in the agent small (45 MiB peak RSS catching up 15M lines; 62 MiB with 64).
# PUB drops at the mark instead, which costs a resync and a reread: it queues up to 64.
PUSH_SNDHWM = 32
HELLO_FIRST_RETRY_S = 0.02
PUB_SNDHWM = 64
# ZeroMQ's reconnection back-off for both sockets: 0.1 s doubling to this.
RECONNECT_IVL_MAX_MS = 2000
AGENT_ID_FILE = "agent-id"


def load_agent_id(state_dir: str) -> str:
    """This agent's id: random, made once and kept in ``state_dir``, so a restart keeps it and
    another host that uses the same name has another (the aggregator tells the two apart)."""
    path = os.path.join(state_dir, AGENT_ID_FILE)
    try:
        with open(path) as fh:
            found = fh.read().strip()
        if 0 < len(found) <= 64 and found.isalnum():
            return found
    except OSError:
        pass
    new = uuid.uuid4().hex[:16]
    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            fh.write(new + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.info("cannot keep the agent id in %s (%s): using %s for this run", path, exc.strerror, new)
    return new


class Transport:
    def __init__(self, ctx: zmq.asyncio.Context, cfg: AgentConfig,
                 on_event: Callable[[dict[str, Any]], None],
                 on_hello: Callable[[dict[str, Any], str | None], None],
                 on_window: Callable[[Any], None],
                 hello_args: Callable[[], dict[str, Any]],
                 heartbeat_args: Callable[[], dict[str, Any]],
                 on_switch: Callable[[Switch], None] | None = None) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.on_event = on_event
        self.on_hello = on_hello
        self.on_window = on_window
        self.hello_args = hello_args
        self.heartbeat_args = heartbeat_args
        self.on_switch = on_switch
        # The heartbeat timeout: three beats without a word from the aggregator.
        self.timeout_s = 3 * cfg.heartbeat_interval_ms / 1000
        self.failover = Failover(cfg.name, cfg.aggregator_list, self.timeout_s)
        self._move = asyncio.Event()
        self._moved_event = Wakeup()  # wakes the heartbeat loop after a move
        # Bumped by every move: a batch read before it is not sent after it (it is read again).
        self.generation = 0
        # What each endpoint's links last said was wrong: a link made again after a move starts
        # from it, so a refusal is logged once per change, not once per round.
        self._link_problems: dict[tuple[str, str], str | None] = {}
        self._stopping_said: str | None = None
        self._opened_at = 0.0  # loop.time() the sockets to the aggregator in use were opened
        self.data: zmq.asyncio.Socket | None = None
        self._data_raw: zmq.Socket | None = None  # type: ignore[type-arg]
        self._control_raw: zmq.Socket | None = None  # type: ignore[type-arg]
        self.control: zmq.asyncio.Socket | None = None
        # Makes the control receiver look at ZMQ_EVENTS again (see request).
        self._control_poke: Callable[[], None] = _nothing
        self.instance: str | None = None
        self.last_reply = 0.0  # loop.time() of the aggregator's last message
        self._replied_at = 0.0  # loop.time() of its last reply to a request (not an event)
        self._ids = itertools.count(1)
        self._hellos: set[int] = set()  # ids of the hellos sent since the last answered one
        self._hello_sent_at = 0.0
        self._hello_backoff_s = HELLO_FIRST_RETRY_S
        self._goodbye_sent = False
        self.sent_batches = 0
        self.torn_sends = 0  # batches whose connection went away between their two parts
        self.sent_bytes = 0
        # Control messages each way: steady at one heartbeat and its reply a beat (plus acks).
        self.control_sent = 0
        self.control_received = 0
        self.agent_id = ""
        self.links: list[Link] = []
        # The aggregator refused our last request (a name clash, a revoked key): its reason, until
        # a request is answered again. Logged once per change of reason.
        self.refusal: str | None = None
        self._refused = False  # since the last hello answered: ship everything again after it
        self._moved = False    # to another aggregator since the last hello answered: the same
        # The instance that last answered a hello of the aggregator in use (a refusal does not
        # forget it, a move does): tells a refusal that ends from a restart.
        self._answered_by: str | None = None
        self._answered_at = 0.0  # loop.time() of that answer
        # What the aggregator's replies say is wrong with this agent (e.g. another agent uses
        # its name); logged when it changes.
        self.told: tuple[str, ...] = ()
        # What the aggregator's last reply said of a hold of the stream all aggregators share
        # (its ``shared_stream_hold``: error, held_s, kind), and when (the loop's clock).
        self.stream_hold: dict[str, Any] | None = None
        self.stream_hold_at = 0.0

    @property
    def endpoint(self) -> AggregatorEndpoints:
        """The aggregator in use."""
        return self.failover.current

    def connect(self) -> None:
        self.agent_id = load_agent_id(self.cfg.state_dir)
        self._open()

    def _open(self) -> None:
        kind = zmq.PUSH if self.cfg.mode == "push" else zmq.PUB
        target = self.endpoint
        self._opened_at = asyncio.get_running_loop().time()
        # Kept at once, so that close() closes them when a setting below fails (an open socket
        # would hold ctx.term(), and with it the exit, for ever).
        data = self.data = self.ctx.socket(kind)
        data.setsockopt(zmq.SNDHWM, PUSH_SNDHWM if kind == zmq.PUSH else PUB_SNDHWM)
        data.setsockopt(zmq.IMMEDIATE, 1)
        data.setsockopt(zmq.LINGER, 0)
        data.setsockopt(zmq.RECONNECT_IVL, 100)
        data.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        control = self.control = self.ctx.socket(zmq.DEALER)
        # The name and this agent's id: two agents given one name by mistake get two routes at
        # the aggregator (one identity would take the other's replies), which can tell both.
        control.setsockopt(zmq.IDENTITY, f"{self.cfg.name[:200]}/{self.agent_id}".encode()[:255])
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.SNDHWM, 100)
        control.setsockopt(zmq.RECONNECT_IVL, 100)
        control.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        control.setsockopt(zmq.MAXMSGSIZE, 16 * 1024 * 1024)
        # Nothing queues while disconnected: heartbeats sent during an outage would otherwise all
        # reach the restarted aggregator at once, and all their replies name a new instance.
        control.setsockopt(zmq.IMMEDIATE, 1)
        public = None
        if self.cfg.curve_secret_key:
            keys = curve.load_secret(self.cfg.curve_secret_key)
            server = curve.load_public(self.cfg.curve_server_key)
            curve.as_client(data, keys, server)
            curve.as_client(control, keys, server)
            public = keys.public
        beat = self.cfg.heartbeat_interval_ms
        ttl = min(3 * beat, 6_553_500)  # libzmq's HEARTBEAT_TTL is at most 6553.5 s
        for sock in (data, control):
            # A link that dies without FIN or RST (a partition) is noticed within three beats by
            # ZMTP heartbeats, and each reconnect attempt gives up after 2 s instead of waiting
            # out TCP's SYN back-off: shipping resumes within seconds of the network healing.
            sock.setsockopt(zmq.HEARTBEAT_IVL, beat)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * beat)
            sock.setsockopt(zmq.HEARTBEAT_TTL, ttl)
            sock.setsockopt(zmq.CONNECT_TIMEOUT, 2000)
        kind_name = "pull" if self.cfg.mode == "push" else "xsub"
        # With a single aggregator a refused connection changes nothing: ZeroMQ keeps retrying.
        grace = min(REFUSED_GRACE_S, self.timeout_s)
        on_refused = self._on_link_refused if self.failover.several else None
        self.links = [
            Link("control", control, target.control,
                 f"is `control` ({target.control}) the aggregator's control endpoint?", public,
                 self._link_problems.get(("control", target.control)), self._on_link_problem,
                 on_refused, grace, self.failover.several),
            Link("data", data, target.data,
                 f"is `data` ({target.data}) the aggregator's {kind_name} endpoint ({self.cfg.mode}"
                 " mode)?", public, self._link_problems.get(("data", target.data)),
                 self._on_link_problem, on_refused, grace, self.failover.several),
        ]
        for link in self.links:
            link.monitor()
        data.connect(target.data)
        control.connect(target.control)
        self._data_raw = zmq.Socket.shadow(data.underlying)
        self._control_raw = zmq.Socket.shadow(control.underlying)

    async def send(self, frames: list[bytes]) -> None:
        """Send now if ZeroMQ has room (no future needed), else wait for room. A batch still
        waiting when the agent moves to another aggregator is not sent: everything not
        acknowledged is read again from the acknowledged offsets for the new one."""
        assert self.data is not None and self._data_raw is not None
        raw = self._data_raw
        generation = self.generation
        while True:
            try:
                # Plain sends with int flags: send_multipart's loop and enum arithmetic cost more
                # than the sends themselves (2.5 -> 1.3 us a message).
                raw.send(frames[0], _MORE_NOW)
                break
            except zmq.Again:
                # No room (or no connection: IMMEDIATE): wait until there is, with a poll
                # rather than a send future, which, cancelled at shutdown, would be left
                # holding an exception nobody retrieves.
                await self._wait_for_room()
                if self.generation != generation:
                    return
        # ZeroMQ takes a message's later parts once it took its first (the high-water mark
        # counts whole messages), unless the connection went away in between (the aggregator
        # stopping): then it takes the first part back and says Again. The batch went nowhere,
        # as if lost on the way: the aggregator's resync, the ack timeout or the hello after its
        # restart sends it again. (An uncaught Again here stopped the whole agent.) Copied even
        # when large: a zero-copy send hands the buffer to pyzmq's garbage-collector thread,
        # which cost more than the copy (backlog: 88% -> 94% of the floor's throughput).
        try:
            raw.send(frames[1], _NOW)
        except zmq.Again:
            self.torn_sends += 1
            return
        self.sent_batches += 1
        self.sent_bytes += len(frames[1])

    async def _wait_for_room(self) -> None:
        """Until the data socket may take a message, at most a second. A move closes the socket,
        which cancels the poll: that ends the wait, not the task waiting (asyncio.wait)."""
        assert self.data is not None
        poll = cast("asyncio.Future[Any]", self.data.poll(1000, zmq.POLLOUT))  # type: ignore[call-arg]
        try:
            await asyncio.wait((poll,))
        finally:
            if not poll.done():
                poll.cancel()
            elif not poll.cancelled():
                poll.exception()

    def request(self, command: str, args: dict[str, Any]) -> int | None:
        """Send a request now; its id, or None when it could not go (not connected: the
        control socket queues nothing then, and the caller tries again later)."""
        assert self.control is not None and self._control_raw is not None
        req_id = next(self._ids)
        # On the plain socket, so that pyzmq's asyncio layer never takes the descriptor that
        # _receive watches (and no future is made per request). Again: not connected (the
        # control socket queues nothing then).
        try:
            self._control_raw.send(wire.encode_request(req_id, command, args), _NOW)
        except zmq.ZMQError:
            return None
        finally:
            # A send processes the socket's pending commands, and with them the signal of a
            # message that arrived meanwhile: its descriptor will not say so again. The
            # receiver looks at ZMQ_EVENTS once more.
            self._control_poke()
        self.control_sent += 1
        return req_id

    def aggregator_alive(self, within_s: float) -> bool:
        """Heard from the aggregator lately, and the data connection not known to be refused
        (resending to nobody only fills queues, and a PUB socket drops it all)."""
        return (self.answers(within_s) and not self.said_stopping()
                and not any(link.problem for link in self.links if link.role == "data"))

    def said_stopping(self) -> bool:
        """The aggregator in use told us it is stopping: no acknowledgement will come from it
        (an agent stopping then does not wait for one; it waited its whole ack timeout)."""
        return self.instance is not None and self._stopping_said == self.instance

    def answers(self, within_s: float) -> bool:
        """Heard from the aggregator on the control channel within ``within_s``."""
        return asyncio.get_running_loop().time() - self.last_reply < within_s

    def held_by_shared_stream(self, within_s: float) -> dict[str, Any] | None:
        """The aggregator's word, in a reply at most ``within_s`` old, that it commits nothing
        because the stream every aggregator shares takes nothing (aggregator/flow.py:
        ``error``, ``held_s``, ``kind``); None."""
        if self.stream_hold is None or asyncio.get_running_loop().time() - self.stream_hold_at > within_s:
            return None
        return self.stream_hold

    def last_reply_age_s(self) -> float | None:
        """Seconds since the aggregator last said anything (None: never): over a few heartbeat
        intervals, the link is down."""
        if not self.last_reply:
            return None
        return round(asyncio.get_running_loop().time() - self.last_reply, 1)

    def hello(self) -> None:
        """Introduce ourselves. Every hello sent since the last one answered is remembered: a
        reply to any of them is the answer (the aggregator may answer an older one first)."""
        req_id = self.request("hello", self.hello_args())
        if req_id is not None:
            self._hellos.add(req_id)
            self._hello_sent_at = asyncio.get_running_loop().time()

    def hello_in_flight(self) -> bool:
        """A hello went out and may still be answered: within the current back-off, which
        doubles from 20 ms to the heartbeat interval while hellos go unanswered."""
        return bool(self._hellos) and (asyncio.get_running_loop().time() - self._hello_sent_at
                                       < self._hello_backoff_s)

    def ask_hello(self) -> None:
        """Say hello unless one is in flight."""
        if not self.hello_in_flight():
            self.hello()

    async def heartbeat_loop(self) -> None:
        interval = self.cfg.heartbeat_interval_ms / 1000
        while True:
            self.check_silence()
            self.check_data_refused()
            if self.instance is None:
                # Until the first hello is answered, ask again with back-off from 20 ms (the
                # connection is usually up within a few) to the heartbeat interval (the
                # aggregator may be starting, or down).
                self.ask_hello()
                await self._nap(self._hello_backoff_s)
                self._hello_backoff_s = min(2 * self._hello_backoff_s, interval)
                continue
            await self._nap(interval)
            if self.instance is not None:  # not moved to another aggregator meanwhile
                self.request("heartbeat", self.heartbeat_args())

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the agent moves to another aggregator (its hello then
        goes at once, not after a heartbeat interval)."""
        # Not asyncio.wait_for(event.wait()): after a move made during shutdown, the cancel of
        # this task stayed pending for ever inside wait_for (seen on Python 3.11 with uvloop),
        # and the agent never exited. Wakeup is one future and one timer, cancelled at once.
        await self._moved_event.wait(seconds)
        self._moved_event.clear()

    async def receive_loop(self) -> None:
        """Control messages from the aggregator, and the connections' monitors, until cancelled;
        and the moves to another aggregator, made here between two sessions of those."""
        while True:
            if self.failover.wanted is None:
                self._move.clear()
            session = asyncio.ensure_future(
                asyncio.gather(self._receive(), *(link.watch() for link in self.links)))
            moving = asyncio.ensure_future(self._move.wait())
            try:
                await asyncio.wait((session, moving), return_when=asyncio.FIRST_COMPLETED)
                if session.done():
                    session.result()  # a failure in the session is the task's (supervise says so)
                if (delay := self.failover.wait_s()) > 0:
                    await asyncio.sleep(delay)  # the one in use still has its trial
            finally:
                for future in (session, moving):
                    future.cancel()
                await asyncio.gather(session, moving, return_exceptions=True)
            if self.failover.wanted is None:
                # It answered during its trial (which called the move off) and nothing asked for
                # one since: it stays. (A failure after the answer asks again: moved at once.)
                log.debug("aggregator %s answered during its trial: staying", self.endpoint.control)
                for link in self.links:
                    link.monitor()  # the session's end closed them: watch its links again
                continue
            self._switch()

    def fail_over(self, reason: str, refused: bool = False) -> bool:
        """Move to the next aggregator in rank order, soon (from the receive loop); False when
        there is no other (a single aggregator: wait for it, as ever). ``refused``: nothing
        accepts the connection (agent/failover.py says when that moves sooner)."""
        if not self.failover.want(reason, refused):
            return False
        self._move.set()
        return True

    def check_silence(self) -> None:
        """Nothing from the aggregator in use for a heartbeat timeout (since we connected to it,
        when it never answered): try the next one."""
        heard = max(self.last_reply, self._opened_at)
        silent = asyncio.get_running_loop().time() - heard
        if silent >= self.timeout_s:
            self.fail_over(f"no reply for {silent:.1f}s" if self.last_reply else
                           f"no answer within {self.timeout_s:g}s")

    def check_data_refused(self) -> None:
        """The aggregator answers on the control connection, but nothing has accepted the data
        connection for a heartbeat timeout: `data` names a port or socket nothing listens on.
        Said once, as the data link's problem (with another aggregator the agent has moved on
        by then; with one, this is all it can do: batches wait, nothing is lost). Only a data
        connection refused a second or more after the hello was answered counts: after an
        aggregator's restart the data socket's next attempt may come up to 2 s after the
        control's (ZeroMQ's back-off), and what it was refused before then says nothing."""
        data = next((link for link in self.links if link.role == "data"), None)
        now = asyncio.get_running_loop().time()
        began = None if data is None else data.refused_since()
        if (data is None or data.problem is not None or data.refused < 2 or self.instance is None
                or now - self._answered_at < self.timeout_s or not self.answers(self.timeout_s)
                or data.last_refused_at < self._answered_at + REFUSED_GRACE_S
                # The aggregator must have answered a request since the refusals began: one that
                # has just died (or is stopping) still "answers" within the heartbeat timeout,
                # and its data port refuses at once; that is its restart, not a wrong `data`.
                or began is None or self._replied_at <= began + REFUSED_GRACE_S):
            return
        data.set_problem(f"nothing accepts the data connection at {data.endpoint} ({data.refused}"
                         f" attempts in {data.refused_for_s():.0f}s) although the aggregator answers"
                         f" at {self.endpoint.control}: {data.hint}",
                         f"ZeroMQ retries every {RECONNECT_IVL_MAX_MS / 1000:g}s")

    def _switch(self) -> None:
        """Close both sockets (dropping whatever they hold) and open new ones to the next
        aggregator; from then on as after a restart of the aggregator. Acknowledgements the old
        one sent before the move are taken first: a move on refused connections may come while
        they wait unread (an aggregator stopping sends its last acks, then closes), and the
        batches they cover would otherwise go to the next one again."""
        self._take_acks_received()
        for link in self.links:
            self._link_problems[(link.role, link.endpoint)] = link.problem
            link.close()
        for sock in (self.data, self.control):
            if sock is not None:
                sock.close(linger=0)
        self.data = self.control = None
        self._data_raw = self._control_raw = None
        switch = self.failover.move()
        self.generation += 1
        self._moved = True
        self._answered_by = None
        self.instance = None
        self.last_reply = 0.0
        self._hellos.clear()
        self._hello_backoff_s = HELLO_FIRST_RETRY_S
        self._open()
        self._moved_event.set()
        if self.on_switch is not None:
            self.on_switch(switch)

    def _take_acks_received(self) -> None:
        """The acknowledgements already in the control socket's queue (nothing else: a stopping
        event or a reply is about the aggregator being left)."""
        raw = self._control_raw
        if raw is None or raw.closed:
            return
        while True:
            try:
                body = raw.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            with contextlib.suppress(wire.WireError):
                msg = wire.decode_control(body)
                if msg.get("event") == "ack":
                    self.on_event(msg)

    async def _receive(self) -> None:
        """Control messages until cancelled. Not through pyzmq's futures (a future, a callback
        and five looks at ZMQ_EVENTS per message, for every ack): the socket's descriptor is
        watched directly and everything there is read at once. ZeroMQ's descriptor only says
        that its state may have changed (edge-triggered), so ZMQ_EVENTS is looked at after
        every receive, and the wait starts only once it says nothing is left."""
        raw = self._control_raw
        assert raw is not None
        loop = asyncio.get_running_loop()
        fd = cast(int, raw.getsockopt(zmq.FD))
        waiter: list[asyncio.Future[None]] = []

        def readable() -> None:
            if waiter and not waiter[0].done():
                waiter[0].set_result(None)

        self._control_poke = readable

        # Takes the descriptor over from pyzmq's own reader (nothing here awaits a receive or a
        # poll of this socket through pyzmq; its sends never wait: NOBLOCK).
        loop.add_reader(fd, readable)
        try:
            while True:
                while cast(int, raw.getsockopt(zmq.EVENTS)) & _POLLIN:
                    try:
                        body = raw.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break  # nothing after all (seen with CURVE handshakes)
                    self._on_control(body, loop.time())
                waiter[:] = [loop.create_future()]
                await waiter[0]
        finally:
            self._control_poke = _nothing
            if not raw.closed:
                loop.remove_reader(fd)

    def _on_control(self, body: bytes, now: float) -> None:
        self.control_received += 1
        try:
            msg = wire.decode_control(body)
        except wire.WireError as exc:
            log.warning("ignoring a malformed control message from the aggregator: %s", exc)
            return
        if "event" in msg:
            self.last_reply = now
            if msg["event"] == wire.EVENT_STOPPING:
                self.on_stopping(msg)
            else:
                self.on_event(msg)
            return
        if not msg.get("ok"):
            self.on_refused(msg.get("id"), str(msg.get("error")))
            return
        self.last_reply = self._replied_at = now
        self.on_reply(msg.get("id"), msg.get("result") or {})

    def on_stopping(self, msg: dict[str, Any]) -> None:
        """The aggregator in use says it is stopping (a restart, a rolling upgrade): with another
        one configured, move now rather than after a heartbeat timeout; with none, wait for it
        (said once per instance)."""
        instance = msg.get("instance")
        log.debug("aggregator %s says it is stopping (we talk to %s)", instance, self.instance)
        if instance is not None and instance != self.instance:
            return  # an older instance's word
        if self.fail_over(f"aggregator {self.instance} is stopping"):
            return
        if self._stopping_said != self.instance:
            self._stopping_said = self.instance
            log.info("aggregator %s is stopping; waiting for it to come back", self.instance)

    def _on_link_problem(self, link: Link) -> None:
        """A link says what is wrong with the aggregator in use (it refuses this agent's key, it
        is not an aggregator): with another one configured, move on."""
        if link.problem is not None:
            self.fail_over(f"{link.role} connection refused: {link.problem}")

    def _on_link_refused(self, link: Link) -> None:
        """Nothing accepts a connection to the aggregator in use (its process is down, its port
        closed, its ipc:// socket gone) for a second: with another one configured, move on."""
        self.fail_over(f"nothing accepts the {link.role} connection at {link.endpoint}"
                       f" ({link.refused} attempts in {link.refused_for_s():.1f}s)", refused=True)

    def on_refused(self, req_id: Any, error: str) -> None:
        """A request refused (another live agent has our name, our key was revoked...). The
        aggregator is not talking to us: no resending to it, say hello again every beat until it
        answers, then ship everything unacknowledged again. Logged once per reason."""
        moving = self.fail_over(f"it refuses this agent: {error}")
        if error != self.refusal:
            then = ("trying the next aggregator" if moving else
                    f"asking again every {self.cfg.heartbeat_interval_ms / 1000:g}s")
            log.warning("the aggregator at %s refuses this agent: %s (%s)", self.endpoint.control,
                        error, then)
            self.refusal = error
        self._hellos.discard(req_id)
        self._refused = True
        self.instance = None
        self.last_reply = 0.0

    def problems(self) -> list[str]:
        """What is wrong with this agent's connection now, for status and heartbeats."""
        out = [link.problem for link in self.links if link.problem]
        if self.refusal:
            out.append(f"refused by the aggregator: {self.refusal}")
        return out + list(self.told)

    def on_told(self, result: dict[str, Any]) -> None:
        warnings = result.get("warnings")
        told = tuple(str(w) for w in warnings[:10]) if isinstance(warnings, list) else ()
        if told != self.told:
            for warning in told:
                if warning not in self.told:
                    log.warning("the aggregator says: %s", warning)
            if not told:
                log.info("the aggregator reports nothing wrong with this agent any more")
            self.told = told

    def on_reply(self, req_id: Any, result: dict[str, Any]) -> None:
        """A hello or heartbeat reply. The state machine, which never loops on stale replies:

        * a reply to one of the hellos in flight is the answer: the instance it names is the
          aggregator we talk to (a restart if it differs from the one before);
        * any other reply naming another instance (a heartbeat answered by a restarted
          aggregator, or a stale hello reply) asks for one hello, unless one is in flight;
          replies queued during an outage therefore cost one hello, not one each.
        """
        instance = result.get("instance")
        if not isinstance(instance, str) or not instance:
            return
        refusal, self.refusal = self.refusal, None
        if refusal is not None and req_id not in self._hellos:
            log.info("the aggregator at %s answers this agent again", self.endpoint.control)
        self.on_told(result)
        hold = result.get("shared_stream_hold")
        self.stream_hold = hold if isinstance(hold, dict) else None
        self.stream_hold_at = asyncio.get_running_loop().time()
        if req_id in self._hellos:
            self._hellos.clear()
            self._hello_backoff_s = HELLO_FIRST_RETRY_S
            if instance == self.instance:
                pass  # an answer to a hello we sent again while the first was on its way
            else:
                # After a refusal, what was shipped meanwhile may have been dropped: as after a
                # restart of the aggregator, everything unacknowledged goes again.
                change = self._what_changed(instance, refusal)
                self._refused = self._moved = False
                self.instance = self._answered_by = instance
                self._answered_at = asyncio.get_running_loop().time()
                self.failover.on_answer()
                self.on_hello(result, change)
        elif instance != self.instance:
            if not self.hello_in_flight():
                # DEBUG: the hello's answer says the restart at INFO, once.
                log.debug("aggregator instance changed (%s -> %s): saying hello again",
                          self.instance, instance)
                self.ask_hello()
            return
        if "window" in result:
            self.on_window(result["window"])

    def _what_changed(self, instance: str, refusal: str | None) -> str | None:
        """What a hello answered by ``instance`` follows, in words for the log; None when it is
        the first answer of this run (nothing to ship again)."""
        before = self._answered_by
        if self._moved:
            last = self.failover.last
            return f"after the move from {last.source.control}" if last else "after a move"
        if self._refused:
            why = f" ({refusal})" if refusal else ""
            if before is None:
                return f"it takes this agent now, after refusing it{why}"
            if before == instance:
                return f"it takes this agent again, after refusing it{why}"
            return f"it restarted (it was instance {before}) while it refused this agent{why}"
        if self.instance is not None:
            return f"it restarted (it was instance {self.instance})"
        return None

    def status(self) -> dict[str, Any]:
        """The aggregator in use, the ranked list and the moves so far."""
        return self.failover.status()

    def goodbye(self) -> None:
        """Tell the aggregator we stop cleanly (best effort: the control socket lingers a
        moment on close so that it goes out)."""
        if self.control is not None and self.request("goodbye", {"agent": self.cfg.name}) is not None:
            self._goodbye_sent = True

    def close(self) -> None:
        for link in self.links:
            link.close()
        if self.control is not None and self._goodbye_sent:
            self.control.close(linger=300)
            self.control = None
        for sock in (self.data, self.control):
            if sock is not None:
                sock.close(linger=0)
        self.data = self.control = None


def _nothing() -> None:
    pass
