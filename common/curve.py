"""Access control of the producer -> trainer socket (ZeroMQ CURVE).

Loopback endpoints (``tcp://127.0.0.1``, ``tcp://localhost``, ``tcp://[::1]``, ``ipc://``, ``inproc://``)
work without keys. Binding anything else requires a CURVE key folder made by ``python -m trainer.keys``::

    keys/server.key  keys/server.key_secret        the trainer's key pair
    keys/client.key  keys/client.key_secret        a producer key pair (copy to producer machines,
                                                   together with server.key)
    keys/authorized_clients/*.key                  public keys the trainer accepts

The trainer then runs a ZAP authenticator that accepts only peers whose public key is in
``authorized_clients``; peers without keys or with other keys never get a message through.
Key files are ZeroMQ's text certificate format (no pickle).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import zmq

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def is_loopback(endpoint: str) -> bool:
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = urlsplit(endpoint).hostname or ""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_bind_endpoint(endpoint: str, curve_dir: Path | None) -> None:
    """Raise ValueError unless the endpoint is loopback or CURVE keys are given (config validation)."""
    if "://" not in endpoint or endpoint.split("://", 1)[0] not in ("tcp", "ipc", "inproc"):
        raise ValueError(f"endpoint {endpoint!r} must look like tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    if curve_dir is None and not is_loopback(endpoint):
        raise ValueError(
            f"binding {endpoint} exposes the trainer beyond this machine: pass --curve-dir with keys made by "
            "`python -m trainer.keys --out-dir keys` (or bind tcp://127.0.0.1:PORT)"
        )
    if curve_dir is not None:
        for name in ("server.key_secret", "authorized_clients"):
            if not (Path(curve_dir) / name).exists():
                raise ValueError(
                    f"curve dir {curve_dir} has no {name}; create it with `python -m trainer.keys`"
                )


def server_curve(ctx: zmq.Context, sock: zmq.Socket, curve_dir: Path):
    """Make ``sock`` a CURVE server that accepts only the authorized client keys. Call before bind()."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    curve_dir = Path(curve_dir)
    public, secret = zmq.auth.load_certificate(curve_dir / "server.key_secret")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(curve_dir / "authorized_clients"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def client_curve(sock: zmq.Socket, curve_dir: Path) -> None:
    """Give ``sock`` the producer key pair and the trainer's public key. Call before connect()."""
    import zmq.auth

    curve_dir = Path(curve_dir)
    for name in ("client.key_secret", "server.key"):
        if not (curve_dir / name).is_file():
            raise FileNotFoundError(
                f"curve dir {curve_dir} has no {name}; copy it from `python -m trainer.keys`"
            )
    public, secret = zmq.auth.load_certificate(curve_dir / "client.key_secret")
    server_public, _ = zmq.auth.load_certificate(curve_dir / "server.key")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
