"""ZeroMQ publisher with real PUB/SUB sockets: framing, topic filtering, bind errors."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq

from brokers import wait_until
from earshot.config import ZmqConfig
from earshot.events import Event, iso_utc, new_event_id
from earshot.publish import PublishError
from earshot.publish.zmq import ZmqPublisher

pytestmark = pytest.mark.timeout(30)


def make_event(i: int, label: str = "gunshot", source: str = "mic0") -> Event:
    """A distinct start event."""
    return Event(type="start", id=new_event_id(), label=label, source=source, node="n", onset=float(i),
                 offset=None, onset_time=iso_utc(1_700_000_000 + i), offset_time=None, score=0.9)


@pytest.fixture
def pub():
    """A publisher bound to a free loopback port."""
    p = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*"))
    yield p
    p.close(0.2)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def subscribe(ctx: zmq.Context, pub: ZmqPublisher, prefix: bytes) -> zmq.Socket:
    """A SUB socket subscribed to `prefix`, proven live before returning.

    PUB/SUB joins and subscriptions reach the PUB side asynchronously (slow joiner), so
    also subscribe to a probe topic, after `prefix`, and publish probes until one arrives:
    subscriptions are applied in order, so `prefix` is active by then. Probes are drained.
    """
    s = ctx.socket(zmq.SUB)
    s.connect(pub.endpoint)
    s.setsockopt(zmq.SUBSCRIBE, prefix)
    s.setsockopt(zmq.SUBSCRIBE, b"event.probe.")
    probe = make_event(-1, source="probe")
    for _ in range(100):
        pub.publish(probe)
        if s.poll(50):
            break
    else:
        raise AssertionError("SUB socket never received from PUB")
    while s.poll(50):
        s.recv_multipart()
    return s


def recv(s: zmq.Socket, timeout_ms: int = 2000) -> list[bytes] | None:
    return s.recv_multipart() if s.poll(timeout_ms) else None


def test_sub_receives_topic_and_exact_json(pub, ctx):
    """A SUB socket gets `[b"event.<source>.<label>", json]` with the event's exact JSON."""
    s = subscribe(ctx, pub, b"event.")
    e = make_event(1, label="glass_break", source="kitchen")
    pub.publish(e)
    frames = recv(s)
    assert frames == [b"event.kitchen.glass_break", e.to_json().encode()]
    assert Event.from_json(frames[1]) == e


def test_topic_prefix_filtering(pub, ctx):
    """Subscribing to `event.attic.` receives only that source's events."""
    s = subscribe(ctx, pub, b"event.attic.")
    pub.publish(make_event(1, source="garage"))
    wanted = make_event(2, source="attic")
    pub.publish(wanted)
    frames = recv(s)
    assert frames is not None and Event.from_json(frames[1]) == wanted
    assert recv(s, 200) is None


def test_dots_in_names_do_not_break_topic_segments(pub, ctx):
    """A source name with dots cannot fake another source's topic prefix."""
    s = subscribe(ctx, pub, b"event.")
    pub.publish(make_event(1, source="mic.attic"))
    assert recv(s)[0] == b"event.mic_attic.gunshot"


def test_concurrent_publishers_send_whole_messages(pub, ctx):
    """Several worker threads publishing at once never interleave frames (the socket is locked)."""
    s = subscribe(ctx, pub, b"event.")
    n, threads = 200, 4

    def work(t: int) -> None:
        for i in range(n):
            pub.publish(make_event(i, source=f"src{t}"))

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    got = 0
    while (frames := recv(s, 500)) is not None:
        assert len(frames) == 2
        assert frames[0] == b"event." + Event.from_json(frames[1]).source.encode() + b".gunshot"
        got += 1
    assert got == n * threads - pub.dropped and pub.dropped == 0


def test_port_in_use_is_a_clear_error():
    """Binding to a port already taken raises PublishError with the endpoint and a fix."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        endpoint = f"tcp://127.0.0.1:{port}"
        with pytest.raises(PublishError) as info:
            ZmqPublisher(ZmqConfig(endpoint=endpoint))
    assert str(info.value) == (
        f"cannot bind ZeroMQ to {endpoint}: Address already in use; set [zmq] endpoint to another port"
    )


def test_bad_endpoint_is_a_clear_error():
    """A malformed endpoint raises PublishError naming it, not a raw ZMQError."""
    with pytest.raises(PublishError, match="cannot bind ZeroMQ to nonsense"):
        ZmqPublisher(ZmqConfig(endpoint="nonsense"))


def test_publish_after_close_is_counted_not_raised(pub):
    """publish() after close() drops and counts instead of raising into the worker."""
    pub.close(0.1)
    pub.publish(make_event(1))
    assert pub.dropped == 1


def test_a_subscriber_with_many_subscriptions_is_not_cut_off(pub, ctx):
    """The flood guard leaves honest clients alone: 300 subscriptions (about 12 KB) stay connected
    and get their events; a client sending far more than a subscriber needs is cut off (counted)."""
    from earshot.publish.zmqguard import BUDGET_BYTES

    many = ctx.socket(zmq.SUB)
    many.connect(pub.endpoint)
    for i in range(300):
        many.setsockopt(zmq.SUBSCRIBE, f"event.kitchen-{i:04d}.glass_break".encode())
    s = subscribe(ctx, pub, b"event.mic0.")  # also subscribe `many` to the probe through its own topics
    many.setsockopt(zmq.SUBSCRIBE, b"event.mic0.")
    e = make_event(1)
    assert wait_until(lambda: (pub.publish(e), many.poll(20))[1], 10)
    time.sleep(3 * 0.05 + 0.2)  # several guard passes
    pub.publish(e)
    assert recv(many) and pub.stats()["subscribers_cut"] == 0 and recv(s)

    flood = ctx.socket(zmq.SUB)
    flood.connect(pub.endpoint)
    for i in range(BUDGET_BYTES // 100 * 3 // 2):  # libzmq sends at most ~1000 (its pipe limit) at connect
        flood.setsockopt(zmq.SUBSCRIBE, f"x{i:099d}".encode())
    assert wait_until(lambda: pub.stats()["subscribers_cut"] >= 1, 10)
    flood.close(linger=0)
    pub.publish(e)
    assert recv(many)  # the others are unaffected
