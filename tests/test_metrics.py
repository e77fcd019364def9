"""Prometheus metrics: every series exists at zero before any audio, and a running daemon's endpoint,
scraped over HTTP, shows its counters moving (audio captured, hops scored, inference timed, events
counted by label)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import soundfile as sf

pytest.importorskip("prometheus_client", reason="metrics need prometheus-client")
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from brokers import free_port, wait_until  # noqa: E402
from earshot import synth  # noqa: E402
from earshot.config import ConfigError, from_dict  # noqa: E402
from earshot.metrics import MetricsTap, attach_metrics  # noqa: E402
from earshot.publish import Fanout  # noqa: E402
from earshot.service import Service  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SOURCE_SERIES = ("earshot_level_dbfs", "earshot_samples_captured_total", "earshot_samples_lost_total",
                 "earshot_overruns_total", "earshot_hop_lag_seconds", "earshot_hops_total",
                 "earshot_inference_seconds_count", "earshot_source_up", "earshot_ring_backlog_seconds")


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_every_series_starts_at_zero(tiny_model):
    """Before the service starts, each source's counters, each label's event counters (start and end)
    and each publisher's counters exist with value 0, so rate() and increase() work from the start."""
    config = from_dict({"source": [{"name": "yard", "kind": "demo"}, {"name": "porch", "kind": "demo"}],
                        "mqtt": {"enabled": False}, "zmq": {"enabled": False}, "stdout": {"enabled": True}})
    from earshot.publish.stdout import StdoutPublisher

    service = Service(config, tiny_model, Fanout([StdoutPublisher()]))
    tap = MetricsTap(service)
    samples = _samples(generate_latest(tap.registry).decode())
    for source in ("yard", "porch"):
        for name in SOURCE_SERIES:
            if name not in ("earshot_level_dbfs",):
                assert _get(samples, name, source=source) == 0, name
        assert _get(samples, "earshot_level_dbfs", source=source) == -120.0  # silence until the first hop
        for label in tiny_model.labels:
            for kind in ("start", "end"):
                assert _get(samples, "earshot_events_total", source=source, label=label, type=kind) == 0
    assert _get(samples, "earshot_publisher_published_total", publisher="stdout") == 0
    assert _get(samples, "earshot_publisher_dropped_total", publisher="stdout") == 0
    assert _get(samples, "earshot_uptime_seconds") >= 0


def test_listen_address_is_validated():
    """A malformed [metrics] listen is a configuration error naming the key."""
    with pytest.raises(ConfigError, match="metrics.listen"):
        from_dict({"metrics": {"listen": "9721"}})
    assert from_dict({"metrics": {"listen": "[::1]:9000"}}).metrics.listen == "[::1]:9000"
    assert from_dict({}).metrics.listen.startswith("127.0.0.1:")


def test_port_in_use_leaves_detection_running(tiny_model, caplog):
    """A metrics port already taken is one error line; no tap is attached and nothing raises."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = from_dict({"metrics": {"listen": f"127.0.0.1:{port}"}, "mqtt": {"enabled": False},
                            "zmq": {"enabled": False}})
        service = Service(config, tiny_model, Fanout([]))
        assert attach_metrics(service) is None
    assert service.taps == []
    assert any("cannot listen" in r.getMessage() for r in caplog.records)


def test_running_daemon_is_scraped_over_http(tmp_path, tiny_checkpoint):
    """`earshot run` on a file source serves /metrics on loopback: the names are there, and between two
    scrapes samples captured, hops and inference observations grow; the scene's first sound is counted
    under its label; the hop lag stays below a second (the worker keeps up). A SIGHUP after a threshold change
puts the new threshold in force while the source keeps capturing with no sample lost."""
    audio, truth = _early_sound_scene()
    label = truth[0][2]
    wav = tmp_path / "scene.wav"
    sf.write(wav, audio, 16000, subtype="PCM_16")
    port = free_port()
    cfg = tmp_path / "earshot.toml"
    cfg.write_text(f'node = "testnode"\n[[source]]\nname = "yard"\nkind = "file"\npath = "{wav}"\nloop = true\n'
                   f'[model]\npath = "{tiny_checkpoint}"\n[mqtt]\nenabled = false\n[zmq]\nenabled = false\n'
                   f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "earshot", "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> dict:
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return _samples(r.read().decode())

    def up() -> bool:
        try:
            return _get(scrape(), "earshot_hops_total", source="yard") > 0
        except OSError:
            return False

    try:
        assert wait_until(up, timeout_s=40, poll_s=0.2), proc.stderr.read() if proc.poll() is not None else "no hops"
        first = scrape()
        assert wait_until(lambda: _get(scrape(), "earshot_events_total", source="yard", label=label,
                                       type="start") >= 1, timeout_s=20, poll_s=0.3), f"no {label} counted"
        second = scrape()
        for name in ("earshot_samples_captured_total", "earshot_hops_total", "earshot_inference_seconds_count",
                     "earshot_samples_analyzed_total"):
            assert _get(second, name, source="yard") > _get(first, name, source="yard"), name
        assert _get(second, "earshot_samples_lost_total", source="yard") == 0
        assert _get(second, "earshot_source_up", source="yard") == 1
        assert -120 < _get(second, "earshot_level_dbfs", source="yard") < 0
        assert 0 <= _get(second, "earshot_hop_lag_seconds", source="yard") < 1.0
        assert _get(second, "earshot_inference_seconds_sum", source="yard") > 0
        assert _get(second, "earshot_uptime_seconds") > _get(first, "earshot_uptime_seconds")
        assert _get(second, "earshot_worker_heartbeat_age_seconds") < 5
        assert _get(second, "earshot_info", version=_version(), node="testnode",
                    model=_model_name(second)) == 1
        assert any(k[0] == "earshot_threshold" for k in second)

        # `systemctl reload` (SIGHUP) applies a new threshold without dropping audio.
        cfg.write_text(cfg.read_text() + f"[detect]\nthresholds = {{ {label} = 0.91 }}\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _get(scrape(), "earshot_threshold", source="yard", label=label) == 0.91,
                          timeout_s=10, poll_s=0.2), "the reloaded threshold is not in force"
        third = scrape()
        time.sleep(0.5)
        fourth = scrape()
        assert proc.poll() is None
        assert _get(fourth, "earshot_samples_captured_total", source="yard") > \
            _get(third, "earshot_samples_captured_total", source="yard")
        assert _get(fourth, "earshot_samples_lost_total", source="yard") == 0
        assert _get(fourth, "earshot_source_up", source="yard") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def _early_sound_scene():
    """A 6 s generated scene whose first sound starts within 2.5 s (so the test waits little)."""
    for seed in range(20):
        audio, truth = synth.scene(duration_s=6.0, seed=seed)
        if truth and truth[0][0] < 2.5:
            return audio, truth
    raise AssertionError("synth.scene made no early sound in 20 seeds")


def _version() -> str:
    from earshot import __version__

    return __version__


def _model_name(samples: dict) -> str:
    return next(dict(labels)["model"] for (name, labels) in samples if name == "earshot_info")
