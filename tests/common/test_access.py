"""Access control: loopback by default; other addresses need CURVE keys, and peers without them get nothing in."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from common import wire
from common.curve import client_curve, is_loopback
from common.shapes import DEFAULT_SHAPE
from trainer.keys import generate_keys
from trainer.online import Trainer, TrainerConfig


def test_loopback_detection():
    for ep in (
        "tcp://127.0.0.1:5555",
        "tcp://localhost:1",
        "tcp://[::1]:2",
        "ipc:///tmp/x",
        "tcp://127.0.0.1:*",
    ):
        assert is_loopback(ep), ep
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://eth0:5555"):
        assert not is_loopback(ep), ep


def test_default_endpoint_is_loopback_and_others_need_keys(tmp_path):
    assert is_loopback(TrainerConfig().endpoint)
    with pytest.raises(ValueError, match="curve-dir"):
        TrainerConfig(endpoint="tcp://0.0.0.0:5555", run_dir=tmp_path)
    with pytest.raises(ValueError, match="no server.key_secret"):
        TrainerConfig(endpoint="tcp://0.0.0.0:5555", run_dir=tmp_path, curve_dir=tmp_path)


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    return s


def _hello(pid: str) -> list:
    return wire.encode(wire.Hello(pid, "s1", 0, "b", 16, DEFAULT_SHAPE.to_dict()))


def test_curve_rejects_peers_without_keys(tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys)
    generate_keys(tmp_path / "stranger")  # a valid key pair the trainer does not know
    cfg = TrainerConfig(endpoint="tcp://0.0.0.0:*", run_dir=tmp_path / "run", curve_dir=keys)
    trainer = Trainer(cfg)
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    assert trainer.bound.wait(10)
    port = trainer.bound_endpoint.rsplit(":", 1)[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    try:
        plain = _dealer(ctx, endpoint)  # no keys at all
        plain.connect(endpoint)
        plain.send_multipart(_hello("plain"), flags=zmq.NOBLOCK)
        stranger = _dealer(ctx, endpoint)  # keys, but not authorized
        client_curve(stranger, tmp_path / "stranger")
        stranger.curve_serverkey = zmq.auth.load_certificate(keys / "server.key")[0]
        stranger.connect(endpoint)
        stranger.send_multipart(_hello("stranger"), flags=zmq.NOBLOCK)
        good = _dealer(ctx, endpoint)  # the authorized producer key pair
        client_curve(good, keys)
        good.connect(endpoint)
        good.send_multipart(_hello("good"))
        assert good.poll(10000), "authorized producer got no ack"
        ack = wire.decode(good.recv_multipart())
        assert isinstance(ack, wire.Ack) and ack.known and ack.producer_id == "good"
        time.sleep(0.5)
        assert set(trainer.delivery.stats) == {"good"}  # the others never got a message through
        assert not plain.poll(100) and not stranger.poll(100)
    finally:
        for s in (plain, stranger, good):
            s.close()
        ctx.term()
        trainer.stop.set()
        thread.join(30)
