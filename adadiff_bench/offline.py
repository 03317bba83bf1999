"""`--offline`: no network connection while a command runs.

Inside `no_network()`, opening a connection from Python (`socket.connect`, `connect_ex`, and name look-ups,
which reach a DNS server) raises `OfflineError`, a `UserError` and a `ConnectionError` at once: library code
that handles a failed connection sees an ordinary one, and what reaches the CLI is printed as one line.
"""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from .errors import UserError


class OfflineError(UserError, ConnectionError):
    """A connection attempted under --offline."""


def _refused(target) -> OfflineError:
    return OfflineError(f"--offline: refused a network connection to {target!r}; drop --offline to allow it, "
                        "or put what it fetches on disk")


def _connect(sock, address, *args):
    raise _refused(address)


def _look_up_or_connect(address, *args, **kwargs):  # getaddrinfo(host, ...) and create_connection((host, port))
    raise _refused(address)


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Every Python-level connect and name look-up fails while inside; the originals come back after."""
    patched = {(socket.socket, "connect"): _connect, (socket.socket, "connect_ex"): _connect,
               (socket, "getaddrinfo"): _look_up_or_connect, (socket, "create_connection"): _look_up_or_connect}
    originals = {key: getattr(*key) for key in patched}
    try:
        for (owner, name), replacement in patched.items():
            setattr(owner, name, replacement)
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
