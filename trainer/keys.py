"""``python -m trainer.keys --out-dir keys``: generate ZeroMQ CURVE keys for a non-local trainer.

Writes the trainer's key pair, one producer key pair and ``authorized_clients/`` (the public keys the
trainer accepts). Start the trainer with ``--curve-dir keys`` and copy ``server.key`` plus
``client.key_secret`` to each producer machine (``--curve-dir`` there too). Add more producers with
``--client-name``: each gets its own key pair, authorized by copying its ``.key`` into
``authorized_clients/``. See :mod:`common.curve`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from common.cli import parse_config
from common.logs import setup_logging

log = logging.getLogger("trainer.keys")


@dataclass
class KeysConfig:
    """Generate ZeroMQ CURVE key pairs for the trainer and a producer."""

    out_dir: Path = field(default=Path("keys"), metadata={"help": "folder to write the keys into"})
    client_name: str = field(default="client", metadata={"help": "file stem of the producer key pair"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing keys"})

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if not self.client_name.isidentifier():
            raise ValueError(f"client_name {self.client_name!r} must be a plain identifier")


def generate_keys(out_dir: Path, client_name: str = "client", overwrite: bool = False) -> dict[str, Path]:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    out_dir.mkdir(parents=True, exist_ok=True)
    auth_dir = out_dir / "authorized_clients"
    auth_dir.mkdir(exist_ok=True)
    paths: dict[str, Path] = {}
    for name in ("server", client_name):
        public = out_dir / f"{name}.key"
        if public.exists() and not overwrite and name == "server":
            log.info("keeping existing %s", public)
        elif not public.exists() or overwrite:
            zmq.auth.create_certificates(out_dir, name)
        os.chmod(out_dir / f"{name}.key_secret", 0o600)
        paths[name] = public
    shutil.copy(paths[client_name], auth_dir / f"{client_name}.key")
    return paths


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(KeysConfig, argv, prog="python -m trainer.keys")
    setup_logging("keys")
    paths = generate_keys(cfg.out_dir, cfg.client_name, cfg.overwrite)
    print(f"trainer:  --curve-dir {cfg.out_dir}   (server.key_secret, authorized_clients/)")
    print(
        f"producer: copy {paths['server']} and {cfg.out_dir}/{cfg.client_name}.key_secret, then --curve-dir DIR"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
