"""Configuration: defaults load, the shipped example is valid, and every problem is reported at once."""

import subprocess
import sys
from pathlib import Path

import pytest

from earshot import config as cfg

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    """No file at all gives a working default: one microphone, MQTT and ZeroMQ on, ZeroMQ on loopback."""
    c = cfg.load(None)
    assert [s.kind for s in c.active_sources] == ["mic"]
    assert c.zmq.endpoint.startswith("tcp://127.0.0.1:")
    assert c.frontend.chunk_size == 1.0 and c.frontend.chunk_hop == 0.1


def test_example_config_is_valid():
    """The example installed with the systemd unit must load as written."""
    c = cfg.load(ROOT / "systemd" / "earshot.toml")
    assert c.sources[0].name == "mic"


def test_every_problem_is_listed(tmp_path):
    """One load reports unknown keys, wrong types and bad values together, each naming its key."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'node = "my pi"\ncolour = 3\n'
        '[[source]]\nname = "a"\nkind = "file"\n'
        '[[source]]\nname = "a"\nkind = "tape"\nchannel = "x"\n'
        '[frontend]\nchunk_hop = 0.015\n'
        '[detect]\nthresholds = {gunshot = 1.5}\n'
        '[mqtt]\nport = "1883"\nqos = 3\n'
    )
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(bad)
    text = "\n".join(err.value.problems)
    for needle in ("colour: unknown key", "source[1].channel: expected an integer", "mqtt.port: expected an integer",
                   "node:", "'a' is used more than once", "source[0].path", "source[1].kind: 'tape'",
                   "chunk_hop: 0.015", "thresholds.gunshot: 1.5", "mqtt.qos: 3"):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert len(err.value.problems) == 10


def test_syntax_error_and_missing_file(tmp_path):
    """A TOML syntax error or a missing file is one clear problem, not a traceback."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[mqtt\nport = 1\n")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(broken)
    with pytest.raises(cfg.ConfigError, match="file not found"):
        cfg.load(tmp_path / "nope.toml")


def test_integers_accepted_for_floats_and_tables_typed(tmp_path):
    """`hold_s = 1` is a valid float; nested tables build nested frozen dataclasses."""
    c = cfg.from_dict({"detect": {"hold_s": 1, "thresholds": {"alarm": 0.4}}, "source": [{"name": "x", "kind": "demo"}]})
    assert c.detect.hold_s == 1.0 and isinstance(c.detect.hold_s, float)
    assert c.detect.thresholds == {"alarm": 0.4}
    assert c.sources[0].kind == "demo"
    with pytest.raises(AttributeError):
        c.detect.hold_s = 2  # frozen


def test_check_config_cli_exit_codes(tmp_path):
    """`earshot check-config` exits 0 on a good file and 2 with every problem on a bad one, without a traceback."""
    good = subprocess.run([sys.executable, "-m", "earshot", "check-config", str(ROOT / "systemd" / "earshot.toml")],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = 0\nhots = "x"\n')
    out = subprocess.run([sys.executable, "-m", "earshot", "check-config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "mqtt.port: 0 is outside 1..65535" in out.stderr and "mqtt.hots: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
