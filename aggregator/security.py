"""Who may talk to the aggregator: CurveZMQ on every network socket when keys are configured.

* Off (no ``curve_secret_key``): the aggregator runs open, for trusted networks and tests;
  every command is accepted on every control endpoint.
* On: pull, xsub, xpub and the tcp control endpoints require CURVE, and ZAP admits only the
  public keys in ``authorized_keys_dir`` and ``admin_keys_dir`` (deny by default). ipc://
  control endpoints stay plain, protected by the socket file's permissions (0660). Admin
  commands (rotate, reload) are accepted over ipc:// or from a key in ``admin_keys_dir``;
  read-only ones (status, tail) from any admitted key. SIGHUP reloads the key directories.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from aggregator.config import AggregatorConfig
from fleetlog import curve

log = logging.getLogger("fleetlog.aggregator.security")


class Guard:
    def __init__(self, cfg: AggregatorConfig) -> None:
        self.keys: curve.KeyPair | None = None
        self.allowed: set[bytes] = set()
        self.admins: set[bytes] = set()
        self.denied = 0
        self._auth: AsyncioAuthenticator | None = None
        self._cfg = cfg

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def load(self, cfg: AggregatorConfig) -> None:
        """Read the keys; raises curve.KeyError_ (the daemon refuses to start, or keeps the old
        keys on reload)."""
        if not cfg.curve_secret_key:
            self.keys = None
            return
        keys = curve.load_secret(cfg.curve_secret_key)
        allowed = curve.public_keys_in(cfg.authorized_keys_dir) if cfg.authorized_keys_dir else set()
        admins = curve.public_keys_in(cfg.admin_keys_dir) if cfg.admin_keys_dir else set()
        self.keys, self.allowed, self.admins, self._cfg = keys, allowed, admins, cfg
        log.info("CURVE on: %d authorised keys, %d admin keys", len(allowed), len(admins))

    def start(self, ctx: zmq.asyncio.Context) -> None:
        if self.keys is None:
            return
        self._auth = AsyncioAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="fleetlog", credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.allowed or key in self.admins
        if not ok:
            self.denied += 1
            if self.denied <= 10 or self.denied % 1000 == 0:
                log.warning("refused a CURVE client with an unknown key (%d refused so far)", self.denied)
        return ok

    def reload(self, cfg: AggregatorConfig) -> None:
        if self.keys is None and cfg.curve_secret_key:
            log.warning("turning CURVE on needs a restart")
            return
        if self.keys is not None:
            self.load(cfg)

    def protect(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        if self.keys is not None:
            curve.as_server(sock, self.keys)

    def may_admin(self, secure: bool, user_id: str) -> bool:
        """Admin commands: always without CURVE (open mode) or on an ipc:// endpoint."""
        return not secure or user_id.encode() in self.admins

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
