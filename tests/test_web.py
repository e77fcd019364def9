"""The web page in a real headless Chromium against a running `earshot run` daemon on a looping file, with a
real Mosquitto broker: sign-in, live scores, events as fast as MQTT, clips that play, control that reaches
MQTT, and the token on every request when bound beyond loopback. Screenshots of each view are written
(see webdaemon.py for where)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import pytest

from audio_bursts import burst_wav
from brokers import Mosquitto, Subscriber, wait_until
from webdaemon import TOKEN, Daemon, chromium_driver, screenshot_dir, severe_console

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

EVENT_TOPIC = "earshot/webnode/yard/event"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_checkpoint, broker):
    """The daemon bound beyond loopback (0.0.0.0) with a token, on a 20 s file of bursts played in a loop."""
    work = tmp_path_factory.mktemp("web")
    wav = burst_wav(work / "bursts.wav", duration_s=20.0, every_s=2.0)
    d = Daemon(work, tiny_checkpoint, wav, broker.port, listen_host="0.0.0.0")
    try:
        d.wait_ready()
        yield d
    finally:
        code = d.stop()
        log = d.log.read_text()
        assert code == 0, log
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def shots(tmp_path_factory, request):
    """The screenshot folder; its path is printed at the end of the module so a person can look."""
    d = screenshot_dir(tmp_path_factory)
    yield d
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nweb page screenshots: {d}")


@pytest.fixture(scope="module")
def page(daemon, shots):
    """Chromium signed in to the page (the sign-in form is screenshotted on the way)."""
    from selenium.webdriver.common.by import By

    driver = chromium_driver()
    try:
        driver.get(f"http://127.0.0.1:{daemon.port}/")
        driver.find_element(By.ID, "token").send_keys("wrong-token-123")
        driver.find_element(By.ID, "sign-in").click()
        assert wait_until(lambda: "failed" in driver.current_url, 10)
        assert driver.find_elements(By.ID, "token"), "a wrong token must not open the page"
        assert "Wrong token" in driver.page_source
        driver.save_screenshot(str(shots / "login.png"))
        time.sleep(1.1)  # one wrong try per second
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "sign-in").click()
        assert wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "[data-source=yard]"), 15)
        severe_console(driver)  # the wrong try's 303 is not a page error; start counting now
        yield driver
    finally:
        driver.quit()


class TimedSubscriber(Subscriber):
    """A Subscriber that also notes when each message arrived (monotonic seconds)."""

    def __init__(self, *a, **kw) -> None:
        self.arrivals: list[tuple[float, str, bytes]] = []
        super().__init__(*a, **kw)

    def _on_message(self, client, userdata, msg) -> None:
        self.arrivals.append((time.monotonic(), msg.topic, msg.payload))
        super()._on_message(client, userdata, msg)


def test_no_page_data_without_the_token(daemon):
    """Bound to 0.0.0.0: without the token, / is only the sign-in form and every other route is 401,
    including the live feed and the clips; a wrong bearer token is refused too."""
    status, body = daemon.get("/", headers={})
    assert status == 200 and b'action="/login"' in body and b"app.js" not in body
    for path in ("/api/state", "/api/events", "/live", "/clips/", "/clips/abc.flac", "/clips/abc.png",
                 "/static/app.js"):
        assert daemon.get(path, headers={})[0] == 401, path
        assert daemon.get(path, headers={"Authorization": "Bearer not-the-token"})[0] == 401, path
    assert daemon.get("/api/state")[0] == 200
    state = json.loads(daemon.get("/api/state")[1])
    assert state["can_control"] and state["clips"] and [s["name"] for s in state["sources"]] == ["yard"]


def test_page_loads_and_live_scores_move(page, shots):
    """The live view draws a card per source whose level, scores and spectrogram follow every hop, with no
    console error."""
    card = "document.querySelector('[data-source=yard]')"
    assert wait_until(lambda: int(page.execute_script(f"return {card}.dataset.hops")) > 10, 20)
    seen: dict[str, set] = {}
    levels = set()
    for _ in range(30):
        for label, score in page.execute_script(
                f"return [...{card}.querySelectorAll('.score')].map(r => [r.dataset.label, r.dataset.score])"):
            seen.setdefault(label, set()).add(score)
        levels.add(page.execute_script(f"return {card}.querySelector('.level-text').textContent"))
        time.sleep(0.1)
    assert set(seen) == {"alarm", "glass_break", "gunshot"}
    assert max(len(v) for v in seen.values()) > 5, f"scores do not move: {seen}"
    assert len(levels) > 5
    painted = page.execute_script(
        f"const c = {card}.querySelector('canvas'); const d = c.getContext('2d').getImageData(c.width - 20, 0, 20, "
        "c.height).data; let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] + d[i + 1] + d[i + 2] > 0; return n")
    assert painted > 100, "the spectrogram is not drawn"
    page.save_screenshot(str(shots / "live.png"))
    assert severe_console(page) == []


def test_event_appears_within_a_second_of_mqtt(page, broker):
    """Each detection is in the page's events list within a second of its arrival at an MQTT subscriber."""
    from selenium.webdriver.common.by import By

    page.find_element(By.CSS_SELECTOR, "nav [data-view=events]").click()
    sub = TimedSubscriber(broker, [EVENT_TOPIC])
    try:
        checked = 0
        while checked < 3:
            n = len(sub.arrivals)
            assert wait_until(lambda: len(sub.arrivals) > n, 15), "no event on MQTT"
            arrived, _topic, payload = sub.arrivals[n]
            event = json.loads(payload)
            if event["type"] != "start":
                continue
            selector = f"[data-event-id='{event['id']}']"
            assert wait_until(lambda: page.execute_script(f"return document.querySelector(\"{selector}\") !== null"),
                              5, poll_s=0.01)
            delay = time.monotonic() - arrived
            assert delay < 1.0, f"the page showed event {event['id']} {delay:.2f} s after MQTT"
            checked += 1
    finally:
        sub.close()
    assert severe_console(page) == []


def test_clip_plays_with_its_spectrogram(page, shots):
    """A detection's clip is playable in the page (the audio element reaches `playing`) and its spectrogram
    image loads."""
    first = "document.querySelector('#events li:not([hidden]) audio')"
    assert wait_until(lambda: page.execute_script(f"return {first} !== null"), 30), "no clip in the events list"
    page.execute_script(f"{first}.id = 'clip-under-test'")  # newer clips are listed above it meanwhile
    audio = "document.getElementById('clip-under-test')"
    result = page.execute_async_script(
        f"const a = {audio}; const done = arguments[0]; a.play().then(() => done('ok'), e => done(String(e)));")
    assert result == "ok", result
    assert wait_until(lambda: page.execute_script(f"return {audio}.dataset.state === 'playing' && "
                                                  f"{audio}.currentTime > 0"), 10)
    assert page.execute_script(f"return {audio}.duration") > 1.5  # pre_s + post_s of audio
    img = f"{audio}.parentElement.querySelector('img')"
    assert wait_until(lambda: page.execute_script(f"return {img}.complete && {img}.naturalWidth > 0"), 10)
    page.save_screenshot(str(shots / "events.png"))
    assert severe_console(page) == []


def test_control_in_the_page_reaches_mqtt(page, broker, daemon, shots):
    """A threshold set and a source switched off and on in the page arrive on MQTT as retained state
    (what Home Assistant reads) and are saved in the state directory, like an MQTT command."""
    from selenium.webdriver.common.by import By

    sub = Subscriber(broker, ["earshot/webnode/yard/gunshot/threshold", "earshot/webnode/yard/enabled"])
    try:
        page.find_element(By.CSS_SELECTOR, "nav [data-view=control]").click()
        box = page.find_element(By.CSS_SELECTOR, "#controls input[data-label=gunshot]")
        box.clear()
        box.send_keys("0.77")
        box.find_element(By.XPATH, "following-sibling::button[contains(@class, 'set')]").click()
        assert sub.wait_for(lambda m: any(t.endswith("threshold") and p == b"0.77" for t, p, _ in m), 10)
        saved = json.loads((daemon.dir / "state" / "control.json").read_text())
        assert saved["sources"]["yard"]["thresholds"]["gunshot"] == 0.77
        assert json.loads(daemon.get("/api/state")[1])["sources"][0]["thresholds"]["gunshot"] == 0.77
        page.save_screenshot(str(shots / "control.png"))
        toggle = page.find_element(By.CSS_SELECTOR, "#controls input[type=checkbox][data-source=yard]")
        toggle.click()
        assert sub.wait_for(lambda m: any(t.endswith("enabled") and p == b"OFF" for t, p, _ in m), 10)
        page.find_element(By.CSS_SELECTOR, "#controls input[type=checkbox][data-source=yard]").click()
        assert sub.wait_for(lambda m: [p for t, p, _ in m if t.endswith("enabled")][-1:] == [b"ON"], 10)
    finally:
        sub.close()
    assert severe_console(page) == []


def test_control_needs_the_token_and_valid_values(daemon):
    """POST /api/control: refused without the token, refuses NaN and out-of-range thresholds with a reason."""
    def post(body: bytes, headers: dict) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        conn.request("POST", "/api/control", body=body, headers=headers)
        status = conn.getresponse().status
        conn.close()
        return status

    good = {"Content-Type": "application/json", **daemon.headers()}
    assert post(b'{"source": "yard", "label": "gunshot", "threshold": 0.5}', {"Content-Type": "application/json"}) \
        == 401
    for value in ("NaN", "1.5", "0", "\"inf\"", "\"x\""):
        assert post(f'{{"source": "yard", "label": "gunshot", "threshold": {value}}}'.encode(), good) == 400, value
    assert post(b'{"source": "nowhere", "enabled": false}', good) == 400
    assert post(b'{"source": "yard", "enabled": true}', {**good, "Origin": "http://evil.example"}) == 403


@pytest.mark.parametrize("body, needle", [
    ('[web]\nlisten = "0.0.0.0:8765"\n', "web.listen: 0.0.0.0:8765 is reachable from other machines"),
    ('[web]\nlisten = "[::]:8765"\n', "is reachable from other machines"),
    ('[web]\ntoken_file = "{short}"\n', "at least 8 characters"),
    ('[web]\ntimeout_s = nan\n', "web.timeout_s"),
])
def test_open_bind_without_a_token_is_refused(tmp_path, body, needle):
    """check-config and run refuse a web server reachable from other machines without a token (exit 2, one
    message, no traceback), and a token file that is too short."""
    (tmp_path / "short").write_text("abc\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[source]]\nname = "f"\nkind = "file"\npath = "x.wav"\n' + body.format(short=tmp_path / "short"))
    for args in (["check-config", str(cfg)], ["run", "-c", str(cfg)]):
        r = subprocess.run([sys.executable, "-m", "earshot", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_live_feed_costs_nothing_without_a_page():
    """With no page connected the web tap returns before touching the stream or building anything."""
    from earshot.live import EventLog, LiveHub, WebTap

    class NoService:
        def stream(self, name):
            raise AssertionError("looked up a stream with no page open")

    hub = LiveHub("n", ["a"])
    try:
        tap = WebTap(NoService(), hub, EventLog())
        t = time.perf_counter()
        for _ in range(10000):
            tap.on_hop("yard", None)  # type: ignore[arg-type]
        assert time.perf_counter() - t < 0.05
        assert not hub._items
    finally:
        hub.close()


def test_threads_do_not_grow_with_pages(daemon):
    """Opening and dropping live feeds repeatedly leaves no thread or connection behind (one hub thread)."""
    import socket

    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
        s.sendall(f"GET /live HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        assert s.recv(200).startswith(b"HTTP/1.1 200")
        s.close()
        time.sleep(0.15)  # a hop or so: the hub notices a page that hung up at its next round
    status, body = daemon.get("/api/state")
    assert status == 200
    threads = int(subprocess.run(["ps", "-o", "nlwp=", "-p", str(daemon.proc.pid)], capture_output=True,
                                 text=True).stdout.strip() or 0)
    assert 0 < threads < 40, threads



def test_page_without_clips_or_token(tmp_path, tiny_checkpoint, broker, page, shots):
    """Loopback, no token, clips off: the page shows live data and the events as they come, with no player
    and no error; control is not offered and is refused."""
    from selenium.webdriver.common.by import By

    wav = burst_wav(tmp_path / "bursts.wav", duration_s=12.0, every_s=2.0)
    d = Daemon(tmp_path, tiny_checkpoint, wav, broker.port, token=None, clips=False)
    try:
        d.wait_ready()
        state = json.loads(d.get("/api/state")[1])
        assert state["clips"] is False and state["can_control"] is False
        assert d.get("/api/state", headers={"Host": "rebound.example:80"})[0] == 403  # DNS rebinding
        page.get(f"http://127.0.0.1:{d.port}/")
        page.find_element(By.CSS_SELECTOR, "nav [data-view=events]").click()
        assert wait_until(lambda: page.execute_script("return document.querySelectorAll('#events li').length") > 0,
                          30)
        assert page.execute_script("return document.querySelectorAll('#events audio, #events img').length") == 0
        assert page.find_element(By.ID, "no-clips").is_displayed()
        assert not page.find_element(By.CSS_SELECTOR, "nav [data-view=control]").is_displayed()
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        conn.request("POST", "/api/control", body=b'{"source": "yard", "enabled": false}',
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 403  # view-only without a token
        conn.close()
        page.save_screenshot(str(shots / "events-without-clips.png"))
        assert severe_console(page) == []
    finally:
        assert d.stop() == 0
