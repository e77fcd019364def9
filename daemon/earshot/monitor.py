"""`earshot monitor`: a live terminal view of what the detector hears, for placing and tuning microphones.

One screen, redrawn about ten times a second:

- the level of the latest hop in dBFS against the level gate (`detect.min_level_dbfs`),
- a scrolling mel spectrogram (newest column on the right, one column per 0.1 s hop),
- every class's score as a bar with its threshold marked, and which classes are active,
- the latest start/end events.

Two feeds fill the same `MonitorState`:

- `LocalFeed`: a source (file, microphone) opened here and run through the daemon's own
  `StreamAnalyzer` with the configured model, so the numbers are the ones the daemon computes;
- `ZmqFeed`: a running daemon's ZeroMQ score feed (`scores.<source>` messages, schema
  `earshot.scores/1`) and its events (`event.<source>.<label>`), so a daemon that holds the
  microphone can be watched without opening the device twice.

Plain ANSI escape codes, no curses or rich: the frame is a list of strings (`render`), which
keeps the drawing testable and the dependency list short. Shading characters carry the picture
on their own, so it also reads without colour (`--no-color`, logs, `tmux capture-pane`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .analyzer import SILENCE_DBFS, Hop, StreamAnalyzer
from .config import Config, SourceConfig
from .detect import make_rules
from .events import START, Event

_LOGGER = logging.getLogger(__name__)

SCORES_SCHEMA = "earshot.scores/1"
"""Schema of the daemon's per-hop score messages this view reads."""
SCORES_PREFIX = b"scores."
EVENTS_PREFIX = b"event."
METER_MIN_DBFS = -90.0
"""Left end of the level meter (dBFS)."""
PEAK_HOLD_S = 3.0
"""The meter's peak is the loudest hop of this many seconds (s)."""
FRAME_S = 0.1
"""Time between two redraws (s)."""
QUIET_AFTER_S = 5.0
"""A daemon feed with no message for this long is reported as silent (s)."""
SHADES = " ░▒▓█"
"""Spectrogram and bar shading, from empty to full."""
# 256-colour ramp (dark blue -> purple -> orange -> yellow) for the spectrogram, one per shade step.
_RAMP = (16, 17, 18, 54, 90, 126, 162, 198, 202, 208, 214, 220, 226, 227, 229, 231)


@dataclass(frozen=True)
class ScoreMessage:
    """One `earshot.scores/1` message: a hop as the daemon publishes it."""

    source: str
    node: str
    t_end: float
    """End of the scored window (stream seconds)."""
    level_dbfs: float
    labels: tuple[str, ...]
    scores: np.ndarray
    thresholds: tuple[float, ...]
    mel: np.ndarray
    gate_dbfs: float | None = None
    """The daemon's level gate (`detect.min_level_dbfs`); None from a daemon that does not send it."""

    @classmethod
    def from_json(cls, payload: bytes | str) -> ScoreMessage:
        """Parse a score message; ValueError when it is not one."""
        data = json.loads(payload)
        if not isinstance(data, dict) or str(data.get("schema", "")).split("/")[0] != SCORES_SCHEMA.split("/")[0]:
            raise ValueError(f"not an earshot score message: schema {data.get('schema') if isinstance(data, dict) else None!r}")
        labels = tuple(str(x) for x in data["labels"])
        scores = np.asarray(data["scores"], dtype=np.float32)
        # A label the daemon does not report has a null threshold.
        thresholds = tuple(math.nan if x is None else float(x) for x in data.get("thresholds") or [None] * len(labels))
        if len(scores) != len(labels) or len(thresholds) != len(labels):
            raise ValueError("labels, scores and thresholds differ in length")
        gate = data.get("gate_dbfs")
        return cls(str(data.get("source", "?")), str(data.get("node", "?")), float(data["t_end"]),
                   float(data["level_dbfs"]), labels, scores, thresholds,
                   np.asarray(data.get("mel") or [], dtype=np.float32), None if gate is None else float(gate))


class MonitorState:
    """Everything one frame shows, updated by a feed and read by `render` (same thread)."""

    def __init__(self, labels: list[str], thresholds: list[float], *, title: str = "",
                 gate_dbfs: float | None = None, history: int = 400, max_events: int = 40) -> None:
        self.labels, self.thresholds = list(labels), list(thresholds)
        self.title = title
        self.gate_dbfs = gate_dbfs
        """Level gate (dBFS) marked on the meter, when known."""
        self.level = SILENCE_DBFS
        self.levels: deque[tuple[float, float]] = deque()  # (monotonic time, dBFS) for the peak hold
        self.scores = np.zeros(len(labels), dtype=np.float32)
        self.columns: deque[np.ndarray] = deque(maxlen=history)
        self.events: deque[Event] = deque(maxlen=max_events)
        self.active: set[str] = set()
        self.t_end = 0.0
        self.hops = 0
        self.status = "waiting for audio"
        self.source = ""
        self.sources_seen: set[str] = set()
        self.last_update = time.monotonic()

    @property
    def peak(self) -> float:
        """Loudest hop of the last PEAK_HOLD_S seconds (dBFS)."""
        return max((lv for _, lv in self.levels), default=SILENCE_DBFS)

    def update_hop(self, t_end: float, level_dbfs: float, scores: np.ndarray, mel: np.ndarray) -> None:
        """Take one hop's numbers."""
        now = time.monotonic()
        self.t_end, self.level = t_end, level_dbfs
        self.levels.append((now, level_dbfs))
        while self.levels and now - self.levels[0][0] > PEAK_HOLD_S:
            self.levels.popleft()
        self.scores = np.asarray(scores, dtype=np.float32)
        if mel is not None and np.size(mel):
            self.columns.append(np.asarray(mel, dtype=np.float32).reshape(-1))
        self.hops += 1
        self.last_update = now
        self.status = "listening"

    def add_event(self, event: Event) -> None:
        """Take one start or end event."""
        self.events.append(event)
        if event.type == START:
            self.active.add(event.label)
        else:
            self.active.discard(event.label)
        self.last_update = time.monotonic()


# -- drawing -----------------------------------------------------------------------------------


def _fg(code: int, text: str, color: bool) -> str:
    return f"\x1b[38;5;{code}m{text}\x1b[0m" if color else text


def _bar(fraction: float, width: int, mark: float | None = None) -> str:
    """A bar `width` cells wide filled to `fraction` (0..1), with `|` at `mark` (0..1) if given."""
    fraction = min(1.0, max(0.0, fraction if math.isfinite(fraction) else 0.0))
    full = int(fraction * width)
    cells = ["█"] * full + ["░"] * (width - full)
    if full < width and fraction * width - full >= 0.5:
        cells[full] = "▌"
    if mark is not None and math.isfinite(mark) and width:
        cells[min(width - 1, max(0, int(round(mark * width))))] = "|"
    return "".join(cells)


def _scale(indent: int, width: int, left: str, mid: str, right: str) -> str:
    """An axis under a bar that starts after `indent` characters: `left` at its start, `right` at its end."""
    cells = [" "] * (indent + width + 1)
    for text, at in ((left, indent), (mid, indent + width // 2 - len(mid) // 2), (right, indent + width - len(right))):
        cells[at:at + len(text)] = list(text)
    return "".join(cells)


def _spectrogram(columns: list[np.ndarray], rows: int, width: int, color: bool) -> list[str]:
    """Mel columns (oldest first) drawn as `rows` lines, high bands on top, right-aligned in `width` cells."""
    cols = [c for c in columns if c.size][-width:]
    if rows <= 0 or width <= 0:
        return []
    if not cols:
        return [" " * width for _ in range(rows)]
    n_mels = min(c.size for c in cols)
    data = np.stack([c[:n_mels] for c in cols], axis=1)  # (n_mels, T)
    edges = np.linspace(0, n_mels, rows + 1).astype(int)
    bands = np.stack([data[a:max(b, a + 1)].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])])  # (rows, T)
    lo, hi = np.percentile(bands, 5), np.percentile(bands, 99.5)
    norm = np.clip((bands - lo) / (hi - lo if hi - lo > 1e-6 else 1.0), 0.0, 1.0)
    lines = []
    for r in range(rows - 1, -1, -1):  # highest band on top
        cells = []
        for v in norm[r]:
            shade = SHADES[min(len(SHADES) - 1, int(v * len(SHADES)))]
            cells.append(_fg(_RAMP[min(len(_RAMP) - 1, int(v * len(_RAMP)))], shade, color) if color else shade)
        lines.append(" " * (width - len(cols)) + "".join(cells))
    return lines


def _event_line(event: Event) -> str:
    if event.type == START:
        when, what, span = event.onset_time, "START", f"at {event.onset:.2f} s"
    else:
        when, what = event.offset_time or event.onset_time, "END  "
        span = f"{event.onset:.2f}-{(event.offset or event.onset):.2f} s"
    return f"{when[11:23]}  {what}  {event.label:<12} {event.score:.2f}  {event.source}  {span}"


def render(state: MonitorState, cols: int = 80, rows: int = 24, color: bool = True) -> list[str]:
    """One frame as lines of at most `cols` visible characters (ANSI colour codes not counted; 60 at least)."""
    cols = max(60, cols)
    name_w = max([len(x) for x in state.labels] + [5]) + 1
    lines: list[str] = []
    head = f"earshot monitor · t {state.t_end:.1f} s · {state.status} · {state.title}"
    if len(state.sources_seen) > 1:
        head += f" · sources: {', '.join(sorted(state.sources_seen))}"
    lines.append(_fg(250, head[:cols - 8].ljust(cols - 8) + "  q quit", color))

    # Level meter from METER_MIN_DBFS to 0 dBFS.
    bar_w = max(10, cols - 41)
    span = -METER_MIN_DBFS

    def pos(db: float) -> float:
        return (db - METER_MIN_DBFS) / span

    level = state.level
    meter = _bar(pos(level), bar_w, pos(state.gate_dbfs) if state.gate_dbfs is not None else None)
    peak_i = int(pos(state.peak) * bar_w)
    if 0 <= peak_i < bar_w and meter[peak_i] == "░":
        meter = meter[:peak_i] + "▏" + meter[peak_i + 1:]
    warn = " CLIP" if state.peak > -1.0 else (" quiet" if state.gate_dbfs is not None and level < state.gate_dbfs else "")
    meter_c = _fg(196 if warn == " CLIP" else (40 if level > -60 else 244), meter, color)
    lines.append(f"level {level:7.1f} dBFS ▕{meter_c}▏ peak {state.peak:6.1f}{warn}")
    scale = _scale(20, bar_w, f"{METER_MIN_DBFS:.0f}", f"{METER_MIN_DBFS / 2:.0f}", "0")
    if state.gate_dbfs is not None:
        scale += f"  | gate {state.gate_dbfs:.0f}"
    lines.append(_fg(244, scale, color))

    fixed = len(lines) + 2 + len(state.labels) + 2 + 3  # headers, score rows, events (at least 3)
    spec_rows = max(3, min(16, rows - fixed - 3))
    lines.append(_fg(250, f"mel spectrogram (newest right, {FRAME_S:.1f} s per column)", color))
    spec_w = cols - 6
    spec = _spectrogram(list(state.columns), spec_rows, spec_w, color)
    for i, row in enumerate(spec):
        tag = "high" if i == 0 else ("low " if i == len(spec) - 1 else "    ")
        lines.append(f"{tag} ▕{row}")

    sbar_w = max(10, cols - name_w - 30)
    lines.append(_fg(250, "scores".ljust(name_w + 7) + _scale(1, sbar_w, "0", "0.5", "1")[:-1] + "   threshold", color))
    for i, label in enumerate(state.labels):
        s = float(state.scores[i]) if i < len(state.scores) else 0.0
        t = state.thresholds[i] if i < len(state.thresholds) else math.nan
        over = math.isfinite(t) and s >= t
        active = label in state.active
        bar = _fg(196 if active else (214 if over else 33), _bar(s, sbar_w, t), color)
        flag = _fg(196, "● ACTIVE", color) if active else ("  over" if over else "")
        thr = f"{t:.2f}" if math.isfinite(t) else "  ? "
        lines.append(f"{label:<{name_w}} {s:5.2f} ▕{bar}▏ {thr}  {flag}")

    lines.append(_fg(250, "events (latest last)", color))
    room = max(1, rows - len(lines))
    recent = list(state.events)[-room:]
    lines += [_event_line(e)[:cols] for e in recent] or [_fg(244, "(none yet)", color)]
    return lines[:rows]


# -- feeds -------------------------------------------------------------------------------------


class LocalFeed:
    """A source opened in this process and analysed with the daemon's StreamAnalyzer."""

    def __init__(self, config: Config, loaded: Any, source: SourceConfig, state_for: Callable[..., MonitorState]):
        from .capture import make_capture

        self.stop = threading.Event()
        self.capture = make_capture(source, loaded.frontend.sample_rate, self.stop)
        rules = make_rules(loaded.labels, loaded.thresholds, config.detect)
        labels = list(rules) or list(loaded.labels)
        self._index = [list(loaded.labels).index(x) for x in labels]
        what = source.path if source.kind == "file" else (source.device if source.device is not None else "default")
        self.state = state_for(labels, [rules[x].threshold if x in rules else math.nan for x in labels],
                               title=f"{source.kind} {what}", gate_dbfs=config.detect.min_level_dbfs)
        self.state.source = source.name
        self.analyzer = StreamAnalyzer(loaded, config.frontend, config.detect, source=source.name, node=config.node,
                                       on_hop=self._on_hop)
        self.finished = False

    def start(self) -> None:
        """Open the source (raises CaptureError with one clear line if it cannot)."""
        self.capture.start()

    def _on_hop(self, hop: Hop) -> None:
        self.state.update_hop(hop.t_end, hop.level_dbfs, hop.scores[self._index], hop.mel)

    def poll(self, timeout_s: float) -> None:
        """Analyse whatever audio arrived within `timeout_s`."""
        if self.finished:
            time.sleep(timeout_s)
            return
        samples = self.capture.read(timeout_s)
        if samples.size:
            events = self.analyzer.push(samples)
        elif self.capture.finished:
            events = self.analyzer.finish()
            self.finished = True
            self.state.status = "end of input"
            error = getattr(self.capture, "error", None)
            if error:
                self.state.status = f"source failed: {error}"
        else:
            events = []
        for event in events:
            self.state.add_event(event)

    def close(self) -> None:
        self.stop.set()
        self.capture.stop()


class ZmqFeed:
    """A running daemon's score and event feed over a ZeroMQ SUB socket."""

    def __init__(self, endpoint: str, source: str | None, state_for: Callable[..., MonitorState]):
        import zmq

        self.zmq = zmq
        self.endpoint, self.source = endpoint, source
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 1000)
        try:
            self.socket.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise ValueError(f"cannot connect to {endpoint}: {e.strerror}") from None
        # Topics are `scores.<source>` and `event.<source>.<label>`; the exact source is checked on receipt.
        self.socket.setsockopt(zmq.SUBSCRIBE, SCORES_PREFIX + (source.encode() if source else b""))
        self.socket.setsockopt(zmq.SUBSCRIBE, EVENTS_PREFIX + (source.encode() + b"." if source else b""))
        self.state = state_for([], [], title=f"daemon {endpoint}")
        self.state.source = source or ""
        self.state.status = "waiting for the daemon's score feed"
        self.bad = 0
        self.finished = False
        self._started = time.monotonic()
        self._got_any = False

    def start(self) -> None:
        """Nothing to open: SUB connects in the background and reconnects by itself."""

    def poll(self, timeout_s: float) -> None:
        """Take every message that arrives within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.socket.poll(wait_ms):
                break
            try:
                frames = self.socket.recv_multipart(self.zmq.NOBLOCK)
            except self.zmq.Again:
                break
            self._handle(frames)
            if time.monotonic() >= deadline:
                break
        silent = time.monotonic() - max(self.state.last_update, self._started)
        if silent > QUIET_AFTER_S:
            self.state.status = (f"no messages for {silent:.0f} s: is the daemon running with its score feed on?"
                                 if self._got_any else "waiting for the daemon's score feed")

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.bad += 1
            return
        topic, payload = frames
        try:
            if topic.startswith(SCORES_PREFIX):
                self._scores(ScoreMessage.from_json(payload))
            elif topic.startswith(EVENTS_PREFIX):
                event = Event.from_json(payload)
                if event.source == self.state.source or not self.state.source:
                    self.state.add_event(event)
        except (ValueError, TypeError, KeyError) as e:
            self.bad += 1
            if self.bad == 1:
                _LOGGER.warning("ignoring a malformed message on %r: %s", topic[:60], e)

    def _scores(self, msg: ScoreMessage) -> None:
        st = self.state
        st.sources_seen.add(msg.source)
        if not st.source:
            st.source = msg.source  # follow the first source heard unless --source chose one
        if msg.source != st.source:
            return
        if list(msg.labels) != st.labels or list(msg.thresholds) != st.thresholds:
            st.labels, st.thresholds = list(msg.labels), list(msg.thresholds)
        st.title = f"{msg.node}/{msg.source} via {self.endpoint}"
        if msg.gate_dbfs is not None:
            st.gate_dbfs = msg.gate_dbfs
        st.update_hop(msg.t_end, msg.level_dbfs, msg.scores, msg.mel)
        self._got_any = True

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


# -- terminal loop -------------------------------------------------------------------------------


class _Terminal:
    """Alternate screen, hidden cursor and unbuffered keys while the monitor runs; restored on exit."""

    def __init__(self, out: TextIO, interactive: bool) -> None:
        self.out, self.interactive = out, interactive
        self._saved: Any = None

    def __enter__(self) -> _Terminal:
        if self.interactive:
            self.out.write("\x1b[?1049h\x1b[?25l\x1b[2J")
            self.out.flush()
            if sys.stdin.isatty():
                import termios
                import tty

                self._saved = termios.tcgetattr(sys.stdin.fileno())
                tty.setcbreak(sys.stdin.fileno())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)
        if self.interactive:
            self.out.write("\x1b[0m\x1b[?25h\x1b[?1049l")
            self.out.flush()

    def key(self) -> str | None:
        """A key pressed since the last call, without waiting."""
        if self._saved is None:
            return None
        ready, _, _ = select.select([sys.stdin], [], [], 0)
        return os.read(sys.stdin.fileno(), 1).decode(errors="replace") if ready else None

    def draw(self, lines: list[str]) -> None:
        if self.interactive:
            self.out.write("\x1b[H" + "".join(line + "\x1b[K\r\n" for line in lines[:-1]) + lines[-1] + "\x1b[K\x1b[J")
        else:
            self.out.write("\n".join(lines) + "\n\n")
        self.out.flush()


def run_monitor(feed: Any, *, out: TextIO = sys.stdout, color: bool | None = None, duration_s: float | None = None,
                exit_at_end: bool = False) -> int:
    """Draw `feed.state` until q, Ctrl-C, SIGTERM, `duration_s` or (with `exit_at_end`) the end of the input."""
    interactive = out.isatty()
    color = interactive and os.environ.get("NO_COLOR") is None if color is None else color
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    feed.start()
    started = time.monotonic()
    redraw_s = FRAME_S if interactive else 1.0
    next_draw = 0.0
    try:
        with _Terminal(out, interactive) as term:
            while not stop.is_set():
                feed.poll(0.02)
                now = time.monotonic()
                if now >= next_draw:
                    size = shutil.get_terminal_size((100, 30))
                    term.draw(render(feed.state, size.columns, size.lines, color))
                    next_draw = now + redraw_s
                if term.key() in ("q", "Q"):
                    break
                if duration_s is not None and now - started >= duration_s:
                    break
                if exit_at_end and feed.finished:
                    size = shutil.get_terminal_size((100, 30))
                    term.draw(render(feed.state, size.columns, size.lines, color))
                    break
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
