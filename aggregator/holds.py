"""Failed writes: a topic held back alone, the journal holding everything, and the disk probed
with back-off until it takes writes again."""

from __future__ import annotations

import errno
import logging
import time

from aggregator.files import Hold, SinkError
from aggregator.journal import JournalError
from aggregator.stages import Stages

log = logging.getLogger("fleetlog.aggregator")

# Held topics logged one by one; past that, one line counts the rest (a full output disk
# holds every topic at once).
_HOLDS_LOGGED = 10

class Holds(Stages):
    """Held topics, the state error, and probing the disk."""

    def on_write_error(self, topic: str, exc: SinkError, need_bytes: int) -> None:
        """A batch for ``topic`` could not be written (the file is as before it)."""
        self.totals.write_errors += 1
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            now = time.monotonic()
            if self.descriptors_short_at is None:
                log.warning("out of file descriptors (%s; %d topic files open, at most %d kept open):"
                            " batches for topics without an open file wait for the next commit, which"
                            " lets files be closed; nothing is lost or doubled. Raise LimitNOFILE if"
                            " this lasts", exc.strerror, len(self.sink.open_files),
                            self.sink.max_open)
            self.descriptors_short_at = now
            self.totals.descriptor_waits += 1
            self.commit_wake.set()
            return
        self.hold_topic(topic, exc, need_bytes)

    def hold_topic(self, topic: str, exc: OSError, need_bytes: int = 0) -> None:
        now = time.monotonic()
        hold = self.sink.held.get(topic)
        if hold is None:
            hold = self.sink.held[topic] = Hold(str(exc), exc.errno, now)
            self.refusing = True
            if len(self.sink.held) <= _HOLDS_LOGGED:
                log.error("cannot write output of topic %s (%s): holding it back; its batches are not"
                          " acknowledged (agents keep them and resend), the other topics go on", topic, exc)
            else:
                self._holds_unlogged += 1
            self.show_disk_error()
        elif hold.errno != exc.errno:
            log.error("topic %s still held back, now: %s", topic, exc)
            hold.error, hold.errno = str(exc), exc.errno
            self.show_disk_error()
        # A retry needs room for a page at least, and for the write that failed at most (a batch
        # bigger than a nearly full partition may still fit once the agent splits its resend).
        hold.need_bytes = min(need_bytes, 4096)
        hold.failed_again(now)

    def release_topic(self, topic: str) -> None:
        """A real write to a held topic succeeded."""
        hold = self.sink.held.pop(topic)
        if len(self.sink.held) < _HOLDS_LOGGED:
            log.warning("topic %s writable again after %.0fs; its agents resend the batches refused"
                        " meanwhile (%d)", topic, time.monotonic() - hold.since, hold.refused_batches)
        self.refusing = bool(self.sink.held) or self.state_error is not None
        self.show_disk_error()

    def on_state_error(self, exc: OSError) -> None:
        """Nothing can be committed (the journal, or a rotation, failed): take no batches at all."""
        self.totals.write_errors += 1
        now = time.monotonic()
        hold = self.state_error
        if hold is None:
            log.error("cannot commit (%s): taking no batches and acknowledging nothing until it can;"
                      " agents keep their data and resend", exc)
            hold = self.state_error = Hold(str(exc), exc.errno, now)
            self.refusing = True
        elif hold.errno != exc.errno:
            log.error("still cannot commit, now: %s", exc)
            hold.error, hold.errno = str(exc), exc.errno
        hold.failed_again(now)
        self.show_disk_error()

    def show_disk_error(self) -> None:
        """``disk_error`` (status, metrics, systemd STATUS=): the state's error, else the topics'."""
        if self.state_error is not None:
            error: str | None = self.state_error.error
        elif self.sink.held:
            topic, hold = next(iter(self.sink.held.items()))
            more = len(self.sink.held) - 1
            error = f"topic {topic}: {hold.error}" + (f" (and {more} more topics)" if more else "")
        else:
            error = None
        if error != self.disk_error:
            self.notifier.notify(f"STATUS=output not writable: {error}" if error else
                                 "STATUS=output writable again")
        self.disk_error = error

    def on_disk_error(self, exc: SinkError) -> None:
        """A rotation failed. The batches its journal record took along are committed again;
        a rotation left half done holds its topic until it is finished."""
        for key, end in self.journal.take_unwritten().items():
            durable = self.journal.state.streams.get(key)
            if durable is None or durable[0] < end:
                self.pending[key] = max(end, self.pending.get(key, 0))
        unfinished = list(self.journal.state.rotations)
        if unfinished and not isinstance(exc, JournalError):
            for topic in unfinished:
                self.sink.forget(topic)  # the rename may or may not have happened
                self.hold_topic(topic, exc)
        else:
            self.on_state_error(exc)

    def finish_rotations(self) -> None:
        """Finish rotations a failure left half done (their topics are held meanwhile)."""
        leftovers = dict(self.journal.state.rotations)
        for topic in leftovers:
            self.sink.forget(topic)
        try:
            self.recover_rotations(leftovers)
        except OSError as exc:
            # Not done: the topics stay held (the journal keeps the intent) and are tried again.
            self.on_disk_error(exc if isinstance(exc, SinkError) else
                               SinkError(exc.errno, f"finishing a rotation failed: {exc.strerror}"))
            return
        for topic in leftovers:
            if topic in self.sink.held:
                self.release_topic(topic)

    def probe_disk(self) -> None:
        """Held topics whose retry is due: if the cheap probe passes (directory and file open,
        room for the write that failed; no fixed-size test write, so a nearly full partition
        recovers too) their agents are asked to resend, and the next real write decides."""
        now = time.monotonic()
        probed = False
        for topic, hold in list(self.sink.held.items()):
            if hold.retrying or now < hold.retry_at:
                continue
            if topic in self.journal.state.rotations:
                self.finish_rotations()
                continue
            why = self.sink.probe(topic, hold.need_bytes)
            hold.failed_again(now)
            if why is None:
                hold.retrying = probed = True
            else:
                log.debug("topic %s still held back: %s", topic, why)
        if probed:
            self.resync_refused()
        if self._holds_unlogged:
            log.error("%d more topics held back (aggregatorctl status lists them)", self._holds_unlogged)
            self._holds_unlogged = 0
        if self.descriptors_short_at is not None and now - self.descriptors_short_at > 60:
            log.info("no shortage of file descriptors for 60s")
            self.descriptors_short_at = None
