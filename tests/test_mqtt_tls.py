"""MQTT security against a real Mosquitto with TLS and password authentication (our own CA and
certificates made with openssl, passwords with mosquitto_passwd), MQTT 3.1.1 and 5."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from brokers import wait_until
from earshot.config import MqttConfig
from earshot.events import Event, iso_utc, new_event_id
from earshot.publish.mqtt import PASSWORD_ENV, MqttPublisher

pytestmark = pytest.mark.timeout(60)


def _pki(d: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=earshot-test-ca")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'earshot'}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", "ext.cnf")
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture
def secure_broker(mosquitto_factory, tmp_path):
    """Mosquitto with a TLS-only listener and a password file (user `earshot`, password `s3cret`)."""
    def make(require_certificate: bool = False):
        pki = _pki(tmp_path)
        pw = tmp_path / "passwd"
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "earshot", "s3cret"], check=True, capture_output=True)
        broker = mosquitto_factory(
            f"cafile {pki['ca.crt']}\ncertfile {pki['server.crt']}\nkeyfile {pki['server.key']}\n"
            f"require_certificate {'true' if require_certificate else 'false'}\n"
            f"allow_anonymous false\npassword_file {pw}\n")
        broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", ""))
        return broker.start(), pki, tmp_path
    return make



def _event() -> Event:
    return Event(type="start", id=new_event_id(), label="alarm", source="mic0", node="n", onset=1.0, offset=None,
                 onset_time=iso_utc(1.7e9), offset_time=None, score=0.9)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_tls_with_password_works_and_wrong_password_is_refused(secure_broker, closing, caplog, protocol):
    """Over TLS with the CA file, the right password (from a file) connects and gets an event
    acknowledged; a wrong password is refused with one clear log line naming the fix."""
    broker, pki, d = secure_broker()
    (d / "good").write_text("s3cret\n")
    (d / "bad").write_text("guess\n")
    common = dict(host=broker.host, port=broker.port, tls=True, ca_file=str(pki["ca.crt"]), username="earshot",
                  protocol=protocol, reconnect_max_s=1.0)
    with caplog.at_level(logging.INFO, logger="earshot.publish.mqtt"):
        good = MqttPublisher(MqttConfig(password_file=str(d / "good"), **common), node="good")
        closing(good)
        assert wait_until(lambda: good.connected, 10)
        good.publish(_event())
        assert wait_until(lambda: good.published == 1, 10)

        bad = MqttPublisher(MqttConfig(password_file=str(d / "bad"), **common), node="bad")
        closing(bad)
        refused = lambda: [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]  # noqa: E731
        assert wait_until(lambda: refused(), 10)
        assert refused()[0].startswith("MQTT broker refused the connection: ")
        assert refused()[0].endswith("(check username/password)")
        assert not bad.connected


def test_client_certificate_and_password_from_environment(secure_broker, closing, caplog, monkeypatch):
    """A broker that requires client certificates accepts us with cert_file/key_file (password from
    $EARSHOT_MQTT_PASSWORD), and without them the failure is logged as a TLS problem."""
    broker, pki, _ = secure_broker(require_certificate=True)
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    common = dict(host=broker.host, port=broker.port, tls=True, ca_file=str(pki["ca.crt"]), username="earshot",
                  reconnect_max_s=1.0)
    with caplog.at_level(logging.INFO, logger="earshot.publish.mqtt"):
        ok = MqttPublisher(MqttConfig(cert_file=str(pki["client.crt"]), key_file=str(pki["client.key"]), **common),
                           node="withcert")
        closing(ok)
        assert wait_until(lambda: ok.connected, 10)
        nocert = MqttPublisher(MqttConfig(**common), node="nocert")
        closing(nocert)
        tls_failed = lambda: [r for r in caplog.records  # noqa: E731
                              if "TLS handshake failed" in r.getMessage() or "client certificate" in r.getMessage()]
        assert wait_until(lambda: tls_failed(), 10)
        assert not nocert.connected
