"""CurveZMQ keys: generating them, loading them, and putting them on sockets.

Key files are the ones pyzmq's ``zmq.auth`` reads and writes: ``NAME.key`` (public, z85) and
``NAME.key_secret`` (public and secret). Secret keys live in ``KeyPair`` objects whose repr
never shows them, so they cannot leak into a log line or a status reply by accident.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import zmq
import zmq.auth


class KeyError_(ValueError):  # not the builtin KeyError
    """A key file that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.decode()!r}, secret=<hidden>)"


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write ``name.key`` (0644) and ``name.key_secret`` (0600) into ``directory`` (made 0700)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public = os.path.join(directory, f"{name}.key")
    secret = os.path.join(directory, f"{name}.key_secret")
    for path in (public, secret):
        if os.path.exists(path):
            raise KeyError_(f"{path} exists; refusing to overwrite a key")
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_secret(path: str) -> KeyPair:
    """A key pair from a ``.key_secret`` file, refusing files others may read.

    A public ``.key`` file given instead is named as such (the usual mix-up), before any
    complaint about its mode (a public key file is rightly readable by all)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KeyError_(f"{path}: {exc.strerror}") from None
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyError_(f"{path}: not a key file ({exc})") from None
    if not secret:
        hint = f" ({path}_secret?)" if path.endswith(".key") else ""
        raise KeyError_(f"{path} is a public key file; a secret key is needed here: the "
                        f".key_secret file that aggregatorctl keygen wrote beside it{hint}")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
        raise KeyError_(f"{path}: secret key readable or writable by others (chmod 600 or 640)")
    return KeyPair(public, secret)


def load_public(value: str) -> bytes:
    """A public key given as its 40-character z85 text or as the path of a ``.key`` file."""
    if len(value) == 40 and not os.path.exists(value):
        try:
            zmq.utils.z85.decode(value.encode())
        except ValueError:
            raise KeyError_(f"{value!r} is neither a z85 public key nor a file") from None
        return value.encode()
    try:
        public, _ = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as exc:
        raise KeyError_(f"{value}: not a public key file ({exc})") from None
    return public


def public_keys_in(directory: str) -> set[bytes]:
    """The z85 public keys of every ``*.key`` file in ``directory``."""
    try:
        certs = zmq.auth.load_certificates(directory)
    except (OSError, ValueError) as exc:
        raise KeyError_(f"{directory}: cannot read public keys ({exc})") from None
    return set(certs)


def as_server(sock: zmq.Socket, keys: KeyPair) -> None:  # type: ignore[type-arg]
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"fleetlog")


def as_client(sock: zmq.Socket, keys: KeyPair, server_public: bytes) -> None:  # type: ignore[type-arg]
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
