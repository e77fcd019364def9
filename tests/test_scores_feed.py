"""The ZeroMQ score feed and CURVE encryption with real sockets and a running Service."""

from __future__ import annotations

import json
import re

import pytest
import zmq

from brokers import wait_until
from earshot.config import ZmqConfig
from earshot.events import Event, iso_utc, new_event_id
from earshot.publish.zmq import ZmqPublisher
from inproc import demo_source, running_service

pytestmark = pytest.mark.timeout(60)

KEYS = ["schema", "node", "source", "t_end", "time", "level_dbfs", "labels", "scores", "thresholds", "mel", "gate_dbfs"]


def test_score_feed_messages(tiny_model):
    """With `[zmq] scores = true` every hop sends `scores.<source>` with exactly the documented keys:
    scores per label, the detector's current thresholds, level and an n_mels spectrogram column
    rounded to 2 decimals, about ten per second; event subscribers (`event.`) do not get them."""
    raw = {"source": demo_source(), "mqtt": {"enabled": False}, "clips": {"enabled": False},
           "zmq": {"endpoint": "tcp://127.0.0.1:*", "scores": True}}
    ctx = zmq.Context()
    try:
        with running_service(tiny_model, raw) as (service, integrations, fanout):
            endpoint = fanout.publishers[0].endpoint
            scores, events = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
            for s, prefix in ((scores, b"scores."), (events, b"event.")):
                s.connect(endpoint)
                s.setsockopt(zmq.SUBSCRIBE, prefix)
            got = []
            while len(got) < 25 and scores.poll(5000):
                got.append(scores.recv_multipart())
            assert len(got) == 25
            stream = service.streams[0]
            topic, payload = got[-1]
            msg = json.loads(payload)
            assert topic == b"scores.yard" and list(msg) == KEYS
            assert msg["schema"] == "earshot.scores/1" and msg["node"] == "testnode" and msg["source"] == "yard"
            assert msg["labels"] == list(tiny_model.labels) and len(msg["scores"]) == len(msg["labels"])
            assert all(0.0 <= x <= 1.0 for x in msg["scores"])
            assert msg["thresholds"] == [round(stream.analyzer.detector.thresholds[lab], 4) for lab in msg["labels"]]
            assert msg["gate_dbfs"] == -75.0  # the level gate in force, for `monitor --zmq`
            assert len(msg["mel"]) == tiny_model.frontend.n_mels and all(round(x, 2) == x for x in msg["mel"])
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", msg["time"])
            t = [json.loads(p)["t_end"] for _, p in got[-10:]]
            assert [round(b - a, 3) for a, b in zip(t, t[1:])] == [0.1] * 9
            assert wait_until(lambda: integrations.scores.sent >= 25, 5)
            assert not events.poll(100) or not events.recv_multipart()[0].startswith(b"scores")
    finally:
        ctx.destroy(linger=0)  # closes the SUB sockets too, even after a failed assertion


def test_curve_encryption(tmp_path):
    """With a CURVE secret key the PUB socket only talks to subscribers that know its public key."""
    public, secret = zmq.curve_keypair()
    key_file = tmp_path / "server.key"
    key_file.write_bytes(secret + b"\n")
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*", curve_secret_file=str(key_file)))
    ctx = zmq.Context()
    try:
        assert pub.public_key == public.decode()
        good, plain = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
        client_public, client_secret = zmq.curve_keypair()
        good.curve_serverkey, good.curve_publickey, good.curve_secretkey = public, client_public, client_secret
        for s in (good, plain):
            s.connect(pub.endpoint)
            s.setsockopt(zmq.SUBSCRIBE, b"event.")
        event = Event(type="start", id=new_event_id(), label="alarm", source="m", node="n", onset=0.0, offset=None,
                      onset_time=iso_utc(1.7e9), offset_time=None, score=0.9)
        assert wait_until(lambda: (pub.publish(event), good.poll(20))[1], 10)
        assert good.recv_multipart()[1] == event.to_json().encode()
        for _ in range(20):
            pub.publish(event)
        assert not plain.poll(500)  # the handshake fails: nothing ever arrives in plain text
    finally:
        pub.close(0.2)
        ctx.destroy(linger=0)
