"""Configuration: a TOML file loaded into frozen dataclasses, validated once, every problem reported.

Each stage has its own dataclass; every field carries a docstring with its unit. `load()` collects
all problems (unknown keys, wrong types, bad values) and raises one `ConfigError` listing them, so a
user fixes the file in one pass.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

SOURCE_KINDS = ("mic", "file", "ffmpeg", "stdin", "demo")
DEFAULT_BLOCK_MS = {"mic": 20.0, "file": 100.0, "demo": 100.0}
"""`block_ms` when unset, per source kind (see `SourceConfig.block_ms`)."""
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")  # safe in MQTT topics and ZeroMQ topic prefixes


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class SourceConfig:
    """One audio source; each runs its own capture and detection pipeline."""

    name: str = "mic"
    """Name used in events and topics (letters, digits, `_`, `-`, `.`)."""
    kind: str = "mic"
    """`mic` (sound card), `file` (wav/flac/ogg), `ffmpeg` (URL or device), `stdin` (raw s16le 16 kHz mono) or `demo`."""
    device: int | str | None = None
    """mic: PortAudio device index or a case-insensitive substring of its name; unset = the default input."""
    channel: int | None = None
    """mic: input channel to use (0-based); unset = average all channels. Valid: 0..255."""
    samplerate: int | None = None
    """mic: capture rate (Hz); unset = the device's default. Resampled to the model rate. Valid: 8000..384000."""
    block_ms: float | None = None
    """Capture block length (ms): the capture thread wakes once per block. Unset = 20 for a
    microphone and 100 (the default hop) for a file or the demo. Longer blocks wake it less often,
    but through PulseAudio's ALSA plugin 50 ms blocks lose audio (tests/test_capture.py's T3 capture
    failed 6 of 8 runs at 50 ms, none at 20 ms); a file played at real time has no such limit, and
    the detector looks at it once per hop. ffmpeg and stdin read what arrives. Valid: 1..500."""
    path: str | None = None
    """file: path of the audio file."""
    realtime: bool = True
    """file: play at real time (true) or as fast as the detector runs (false)."""
    loop: bool = False
    """file/demo: start again at the end instead of stopping."""
    url: str | None = None
    """ffmpeg: input URL or device (rtsp://..., http://..., hw:1 with ffmpeg_args = ["-f", "alsa"])."""
    ffmpeg_args: tuple[str, ...] = ()
    """ffmpeg: extra input options placed before `-i`."""
    enabled: bool = True
    """Set false to keep a source in the file but not run it."""

    @property
    def block_s(self) -> float:
        """The capture block length (s): `block_ms`, or the default of the source's kind."""
        ms = self.block_ms if self.block_ms is not None else DEFAULT_BLOCK_MS.get(self.kind, DEFAULT_BLOCK_MS["mic"])
        return float(ms) / 1000.0

    def block_samples(self, rate: int) -> int:
        """The capture block length in samples at `rate` (Hz), at least one."""
        return max(1, int(round(rate * self.block_s)))


@dataclass(frozen=True)
class FrontendConfig:
    """How the stream is cut into model windows."""

    chunk_size: float = 1.0
    """Length of the window the model scores (s); must match the model's training. Valid: (0, 60]."""
    chunk_hop: float = 0.1
    """Time between two scored windows (s); a multiple of 10 ms. Valid: 0.01..60."""


@dataclass(frozen=True)
class ModelConfig:
    """Which network to run and how."""

    path: str | None = None
    """Model checkpoint (.pt); unset = the model shipped with earshot."""
    threads: int = 1
    """CPU threads for inference (1 is right for a few streams on a small board). Valid: 1..64."""


@dataclass(frozen=True)
class DetectConfig:
    """How per-hop scores become start/end events."""

    thresholds: dict[str, float] = field(default_factory=dict)
    """Per-label score needed to start an event (0..1); labels not listed use the model's calibrated value. Valid: (0, 1)."""
    hysteresis: float = 0.7
    """An active event keeps going while its score stays above threshold x hysteresis (0..1). Valid: (0, 1]."""
    confirm_hops: int = 2
    """Consecutive hops above threshold before an event starts (1 = start on the first). Valid: 1..100."""
    hold_s: float = 1.0
    """An event ends once its label has not been heard for this long (s); 1 s bridges the pauses of
    beeping (T3/T4) alarms and merges a burst of shots into one event. Valid: 0..3600."""
    refractory_s: float = 1.0
    """After an event ends, the same label cannot start again for this long (s). Valid: 0..86400."""
    min_level_dbfs: float = -75.0
    """Hops quieter than this (dBFS) score zero: nothing can be detected in near silence. Valid: -120..0."""
    labels: tuple[str, ...] = ()
    """Labels to report; empty = all labels of the model."""


@dataclass(frozen=True)
class MqttConfig:
    """MQTT publisher (events, per-label ON/OFF state, availability)."""

    enabled: bool = True
    """Publish to an MQTT broker."""
    host: str = "localhost"
    """Broker host name or address."""
    port: int = 1883
    """Broker TCP port (8883 is usual with TLS). Valid: 1..65535."""
    topic_prefix: str = "earshot"
    """First level of every topic."""
    client_id: str | None = None
    """MQTT client id; unset = `earshot-<node>`."""
    username: str | None = None
    """User name for the broker; unset = anonymous."""
    password_file: str | None = None
    """File holding the password (first line); unset = the systemd credential `mqtt-password`
    (`LoadCredential=`), else the environment variable EARSHOT_MQTT_PASSWORD."""
    tls: bool = False
    """Connect with TLS."""
    ca_file: str | None = None
    """TLS: CA certificate bundle (PEM); unset = the system's."""
    cert_file: str | None = None
    """TLS: client certificate (PEM), for brokers that require one."""
    key_file: str | None = None
    """TLS: client private key (PEM)."""
    keepalive_s: int = 30
    """Keep-alive interval (s); the broker declares the daemon offline after 1.5x this without traffic. Valid: 5..65535."""
    qos: int = 1
    """QoS for events (0, 1 or 2). Valid: 0..2."""
    protocol: str = "3.1.1"
    """MQTT protocol version: `3.1.1` or `5`."""
    reconnect_max_s: float = 30.0
    """Longest wait between reconnection attempts (s). Valid: 1..3600."""
    queue_limit: int = 10000
    """Messages waiting while the broker is unreachable (on disk under `state_dir`, else in memory); the oldest are dropped (and counted) beyond. Valid: 1..10000000."""
    spool_max_mb: float = 20.0
    """Payload megabytes the waiting messages may take; the oldest are dropped (and counted) beyond. Valid: 0.01..100000."""
    session_expiry_s: int = 86400
    """MQTT 5: how long the broker keeps our session (subscriptions, unacknowledged messages) while we are away (s). Valid: 0..4294967295."""
    control: bool = True
    """Accept run-time changes on `<prefix>/<node>/<source>/enabled/set` and `.../<label>/threshold/set`."""


@dataclass(frozen=True)
class ZmqConfig:
    """ZeroMQ PUB socket (multipart [topic, json])."""

    enabled: bool = True
    """Publish on a ZeroMQ PUB socket."""
    endpoint: str = "tcp://127.0.0.1:5556"
    """Endpoint to bind; loopback by default so only local programs can subscribe."""
    scores: bool = False
    """Also send every hop's class scores, thresholds, level and spectrogram column (topic `scores.<source>`)."""
    curve_secret_file: str | None = None
    """CURVE encryption: file holding the server's secret key (Z85, 40 characters); unset = plain text."""


@dataclass(frozen=True)
class StdoutConfig:
    """JSON lines on standard output (for pipes, demos and debugging)."""

    enabled: bool = False
    """Print every event as one JSON line."""


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics endpoint (levels, counters, inference time, publisher state)."""

    enabled: bool = True
    """Serve metrics over HTTP at `http://<listen>/metrics`."""
    listen: str = "127.0.0.1:9721"
    """Address and TCP port to listen on (`host:port`, `[v6addr]:port`); loopback by default."""


@dataclass(frozen=True)
class HomeAssistantConfig:
    """Home Assistant MQTT discovery: entities appear in Home Assistant with no YAML."""

    enabled: bool = True
    """Publish discovery configs (needs [mqtt] enabled)."""
    discovery_prefix: str = "homeassistant"
    """Home Assistant's discovery prefix; `<prefix>/status` = `online` triggers a re-send."""
    level_interval_s: float = 5.0
    """Interval of the per-source sound level message (s): one message with the max and mean level. Valid: 0.1..86400."""


@dataclass(frozen=True)
class ClipsConfig:
    """Evidence clips: a FLAC file of the audio around each event."""

    enabled: bool = True
    """Save clips (needs `dir` or `state_dir`)."""
    dir: str | None = None
    """Directory of the clips; unset = `<state_dir>/clips`."""
    pre_s: float = 2.0
    """Audio kept before the event's onset (s). Valid: 0..60."""
    post_s: float = 3.0
    """Audio kept after the event's onset (s). Valid: 0..60."""
    max_total_mb: float = 500.0
    """Total size of the clips (MB); the oldest are deleted beyond. Valid: 0.01..10000000."""
    max_age_days: float = 30.0
    """Clips older than this are deleted (days). Valid: 0.001..36500."""
    http: bool = True
    """Serve the clips read-only on the web server (`GET /clips/` index, `GET /clips/<id>.flac`)."""
    listen: str = "127.0.0.1:8765"
    """Deprecated: use [web] listen (still honoured when [web] listen is not set)."""


@dataclass(frozen=True)
class WebConfig:
    """The daemon's HTTP server: the web page, its live feed and the clips, on one port."""

    enabled: bool = True
    """Serve the web page and its live feed (the clips are served there too while [clips] http = true)."""
    listen: str = "127.0.0.1:8765"
    """Address and TCP port (`host:port`, `[v6addr]:port`; port 0 = any free one); loopback by default."""
    token_file: str | None = None
    """File whose first line is the token or password (8+ characters); required when `listen` is not
    loopback; with it every request needs the token, and the page offers run-time control."""
    workers: int = 4
    """Threads answering requests; the live feed has its own thread. Valid: 1..32."""
    max_connections: int = 256
    """Connections held at once (also kept under half the open-file limit); more get 503. Valid: 8..4096."""
    timeout_s: float = 10.0
    """Time a client has to send its request, and to take a response (s). Valid: 1..300."""


def read_token(path: str | os.PathLike) -> str:
    """The token in `path` (its first line, stripped); raises ValueError with a one-line reason."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(token) < 8:
        raise ValueError(f"{path}: the token must be at least 8 characters on the first line")
    return token


def is_loopback(host: str) -> bool:
    """Whether `host` (a literal address or `localhost`) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def web_listen(c: Config) -> str:
    """Where the HTTP server listens: `[web] listen`, or an older file's `[clips] listen` if only that is set."""
    if c.web.listen == WebConfig.listen and c.clips.listen != ClipsConfig.listen:
        return c.clips.listen
    return c.web.listen


MAX_WORKER_PROCESSES = 64
"""Upper bound of `[worker] processes`."""


@dataclass(frozen=True)
class WorkerConfig:
    """How the detection work is spread over the machine's cores."""

    processes: int = 0
    """Worker processes the sources are spread over. 0 = automatic: one process per
    `streams_per_process` sources, at most one per CPU core this process may use; 1 = every source
    in the daemon's own process (no child process). A `stdin` source keeps every source in the
    daemon's process (its standard input cannot be read from another). Valid: 0..64."""
    streams_per_process: int = 32
    """Automatic mode: sources per worker process before another one starts. Valid: 1..1000."""
    hops_per_pass: int = 1
    """Hops of each source scored together in one pass: the worker wakes when this many are due
    and scores them in one batched call. 2 costs about a third less CPU for one stream (waking up,
    not arithmetic, is most of a hop's cost on a small machine) and reports each detection up to
    one hop (`chunk_hop`) later. Valid: 1..10."""


def _default_state_dir() -> str | None:
    # systemd's StateDirectory= sets $STATE_DIRECTORY (colon-separated if several).
    value = os.environ.get("STATE_DIRECTORY", "")
    return value.split(":")[0] or None


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "earshot")
    """Name of this machine in events and topics; default the host name."""
    log_level: str = "info"
    """debug, info, warning or error."""
    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    """Audio sources (TOML: one `[[source]]` table each); default one microphone."""
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    zmq: ZmqConfig = field(default_factory=ZmqConfig)
    stdout: StdoutConfig = field(default_factory=StdoutConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    clips: ClipsConfig = field(default_factory=ClipsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    state_dir: str | None = field(default_factory=_default_state_dir)
    """Directory for the MQTT spool, run-time settings and clips; unset = $STATE_DIRECTORY, else none (all in memory)."""

    def with_sources(self, sources: tuple[SourceConfig, ...]) -> Config:
        """A copy with other sources (the demo fallback uses this)."""
        return replace(self, sources=sources)

    @property
    def active_sources(self) -> tuple[SourceConfig, ...]:
        """The sources to run."""
        return tuple(s for s in self.sources if s.enabled)


# TOML table name -> Config field (`[[source]]` reads better than `[[sources]]`).
_TABLE_ALIASES = {"source": "sources"}


def load(path: str | os.PathLike | None) -> Config:
    """Load and validate a TOML file (None = all defaults). Raises ConfigError listing every problem."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the TOML.
        raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{p}: is a directory, not a configuration file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{p}: not valid TOML: {e}"]) from None
    except RecursionError:
        raise ConfigError([f"{p}: not valid TOML: arrays or tables nested too deeply"]) from None
    return from_dict(raw, base_dir=p.resolve().parent)


def from_dict(raw: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Config:
    """Build a Config from parsed TOML. Raises ConfigError listing every problem.

    Relative paths are resolved against `base_dir` (the config file's folder), not the current
    directory, which is `/` under systemd.
    """
    problems: list[str] = []
    raw = {_TABLE_ALIASES.get(k, k): v for k, v in raw.items()}
    try:
        config = _build(Config, raw, "", problems)
    except RecursionError:
        raise ConfigError(["arrays or tables nested too deeply"]) from None
    if config is not None and base_dir is not None:
        config = _resolve_paths(config, Path(base_dir))
    if config is not None:
        problems += _check(config)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config


def _build(cls: type, table: Any, where: str, problems: list[str]) -> Any:
    """Construct dataclass `cls` from a TOML table, appending type problems instead of raising."""
    if not isinstance(table, dict):
        problems.append(f"{where or 'top level'}: expected a table, got {_tname(table)}")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known:
            valid = ", ".join(sorted(_shown(k) for k in known))
            problems.append(f"{_join(where, _shown(key))}: unknown key (valid keys: {valid})")
    kwargs = {}
    for name, f in known.items():
        if name not in table:
            continue
        value = _convert(hints[name], table[name], _join(where, _shown(name)), problems)
        if value is not _INVALID:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        problems.append(f"{where or 'top level'}: {e}")
        return None


_INVALID = object()


def _convert(hint: Any, value: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `hint`; return it converted, or _INVALID after noting a problem."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if is_dataclass(hint):
        built = _build(hint, value, where, problems)
        return _INVALID if built is None else built
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            sub: list[str] = []
            converted = _convert(option, value, where, sub)
            if not sub:
                return converted
        wanted = " or ".join(_hname(a) for a in args if a is not type(None))
        problems.append(f"{where}: expected {wanted}, got {_tname(value)} {value!r}")
        return _INVALID
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {_tname(value)}")
            return _INVALID
        items = [_convert(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a table, got {_tname(value)}")
            return _INVALID
        out = {k: _convert(args[1], v, _join(where, k), problems) for k, v in value.items()}
        return _INVALID if any(v is _INVALID for v in out.values()) else out
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where}: {value} is not a finite number")
        return _INVALID
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        problems.append(f"{where}: expected {_hname(hint)}, got {_tname(value)} {value!r}")
        return _INVALID
    return value


def check(c: Config) -> list[str]:
    """Every value problem of a built Config (ranges, names, paths), one line each; empty if none.

    For a Config changed after loading (command-line overrides); `load` and `from_dict` already ran it.
    """
    return _check(c)


def _check(c: Config) -> list[str]:
    """Value checks that need more than a type."""
    p: list[str] = []
    if not _NAME_RE.match(c.node):
        p.append(f"node: {c.node!r} may only contain letters, digits, '_', '-' and '.'")
    if c.log_level not in ("debug", "info", "warning", "error"):
        p.append(f"log_level: {c.log_level!r} is not one of debug, info, warning, error")
    for sub, where in ((c.frontend, "frontend"), (c.model, "model"), (c.detect, "detect"), (c.mqtt, "mqtt"),
                       (c.homeassistant, "homeassistant"), (c.clips, "clips"), (c.web, "web"),
                       (c.worker, "worker")):
        p += _check_ranges(sub, where)
    for i, s in enumerate(c.sources):
        p += _check_ranges(s, f"source[{i}]")
    for key, limit in MAX_STRING_BYTES.items():
        section, _, name = key.rpartition(".")
        values = [(f"source[{i}].name", s.name) for i, s in enumerate(c.sources)] if key == "source.name" else \
            [(key, getattr(getattr(c, section) if section else c, name))]
        for where, value in values:
            if value is not None and len(value.encode("utf-8")) > limit:
                p.append(f"{where}: {len(value.encode('utf-8'))} bytes long; at most {limit}")
    names = [s.name for s in c.sources]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        hint = " (a source without `name` is called 'mic': give each source a name)" if dup == "mic" else ""
        p.append(f"source: the name {dup!r} is used more than once{hint}")
    if not c.active_sources:
        p.append("source: no enabled source; add a [[source]] table")
    for i, s in enumerate(c.sources):
        w = f"source[{i}]"
        if not _NAME_RE.match(s.name):
            p.append(f"{w}.name: {s.name!r} may only contain letters, digits, '_', '-' and '.'")
        if s.kind not in SOURCE_KINDS:
            p.append(f"{w}.kind: {s.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        if s.kind == "file" and not s.path:
            p.append(f"{w}.path: a file source needs a path")
        elif s.kind == "file" and s.enabled and (why := readable_file_problem(s.path)):
            p.append(f"{w}.path: {why}")
        if s.kind == "ffmpeg" and not s.url:
            p.append(f"{w}.url: an ffmpeg source needs a url")
    f = c.frontend
    if f.chunk_hop > f.chunk_size:
        p.append("frontend.chunk_hop: must be no longer than chunk_size")
    elif abs(round(f.chunk_hop / 0.01) * 0.01 - f.chunk_hop) > 1e-9:
        p.append(f"frontend.chunk_hop: {f.chunk_hop} s is not a multiple of the 10 ms frame")
    if c.model.path and not Path(c.model.path).exists():
        # Only a missing file is a configuration error; a folder, an unreadable or a damaged file is
        # for the model loader, whose one line says what the file is instead (exit 1, as `run` gives).
        p.append(f"model.path: {c.model.path}: no such file")
    d = c.detect
    for label, t in d.thresholds.items():
        if not THRESHOLD_RANGE[0] < t < THRESHOLD_RANGE[1]:
            p.append(f"detect.thresholds.{label}: {t} is outside (0, 1)")
    m = c.mqtt
    if m.protocol not in ("3.1.1", "5"):
        p.append(f"mqtt.protocol: {m.protocol!r} is not '3.1.1' or '5'")
    if not m.topic_prefix or any(ch in m.topic_prefix for ch in "+#") or m.topic_prefix.endswith("/"):
        p.append(f"mqtt.topic_prefix: {m.topic_prefix!r} must be non-empty, without + or #, not ending in /")
    for name in ("password_file", "ca_file", "cert_file", "key_file"):
        value = getattr(m, name)
        if value and not Path(value).is_file():
            p.append(f"mqtt.{name}: {value} does not exist")
    if bool(m.cert_file) != bool(m.key_file):
        p.append("mqtt.cert_file and mqtt.key_file: give both or neither")
    if not re.match(r"^(tcp|ipc|inproc)://.+", c.zmq.endpoint):
        p.append(f"zmq.endpoint: {c.zmq.endpoint!r} must look like tcp://127.0.0.1:5556 or ipc:///path")
    if c.zmq.curve_secret_file and not Path(c.zmq.curve_secret_file).is_file():
        p.append(f"zmq.curve_secret_file: {c.zmq.curve_secret_file} does not exist")
    h = c.homeassistant
    if not h.discovery_prefix or any(ch in h.discovery_prefix for ch in "+#") or h.discovery_prefix.endswith("/"):
        p.append(f"homeassistant.discovery_prefix: {h.discovery_prefix!r} must be non-empty, without + or #, "
                 "not ending in /")
    k = c.clips
    if k.pre_s + k.post_s > 60:
        p.append("clips.pre_s, clips.post_s: together at most 60 s")
    if split_listen(k.listen, any_port=True) is None:
        p.append(f"clips.listen: {k.listen!r} must look like 127.0.0.1:8765 (port 0..65535)")
    w = c.web
    listen = web_listen(c)
    key = "web.listen" if listen == w.listen else "clips.listen"
    address = split_listen(listen, any_port=True)
    if address is None:
        p.append(f"{key}: {listen!r} must look like 127.0.0.1:8765 or [::1]:8765 (port 0..65535)")
    if w.token_file:
        try:
            read_token(w.token_file)
        except ValueError as e:
            p.append(f"web.token_file: {e}")
    elif address is not None and (w.enabled or (k.enabled and k.http)) and not is_loopback(address[0]):
        p.append(f"{key}: {listen} is reachable from other machines; set web.token_file (a file holding a "
                 "token or password) or listen on 127.0.0.1 (a reverse proxy can publish it)")
    if split_listen(c.metrics.listen) is None:
        p.append(f"metrics.listen: {c.metrics.listen!r} must look like 127.0.0.1:9721 or [::1]:9721 (port 1..65535)")
    return p



# Valid range of every numeric field, checked once here (NaN and inf are refused when read); each
# field's doc repeats its range (a test keeps the two in step). (low, high, low is exclusive).
RANGES: dict[type, dict[str, tuple[float, float, bool]]] = {
    SourceConfig: {"channel": (0, 255, False), "samplerate": (8000, 384000, False), "block_ms": (1, 500, False)},
    FrontendConfig: {"chunk_size": (0, 60, True), "chunk_hop": (0.01, 60, False)},
    ModelConfig: {"threads": (1, 64, False)},
    DetectConfig: {"hysteresis": (0, 1, True), "confirm_hops": (1, 100, False), "hold_s": (0, 3600, False),
                   "refractory_s": (0, 86400, False), "min_level_dbfs": (-120, 0, False)},
    MqttConfig: {"port": (1, 65535, False), "keepalive_s": (5, 65535, False), "qos": (0, 2, False),
                 "reconnect_max_s": (1, 3600, False), "queue_limit": (1, 10_000_000, False),
                 "spool_max_mb": (0.01, 100_000, False), "session_expiry_s": (0, 2**32 - 1, False)},
    HomeAssistantConfig: {"level_interval_s": (0.1, 86400, False)},
    ClipsConfig: {"pre_s": (0, 60, False), "post_s": (0, 60, False), "max_total_mb": (0.01, 10_000_000, False),
                  "max_age_days": (0.001, 36500, False)},
    WebConfig: {"workers": (1, 32, False), "max_connections": (8, 4096, False), "timeout_s": (1, 300, False)},
    WorkerConfig: {"processes": (0, MAX_WORKER_PROCESSES, False), "streams_per_process": (1, 1000, False),
                   "hops_per_pass": (1, 10, False)},
}
THRESHOLD_RANGE = (0.0, 1.0)
"""`[detect] thresholds` values: strictly between 0 and 1."""
MAX_STRING_BYTES: dict[str, int] = {"mqtt.client_id": 65535, "mqtt.username": 65535, "mqtt.topic_prefix": 1024,
                                    "homeassistant.discovery_prefix": 1024, "node": 255, "source.name": 255}
"""UTF-8 length limits: MQTT strings hold at most 65535 bytes, and a topic is built from several parts."""


def range_text(lo: float, hi: float, lo_open: bool) -> str:
    """A range as the docs write it: `5..65535`, or `(0, 1]` for an open low end."""
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    return f"({num(lo)}, {num(hi)}]" if lo_open else f"{num(lo)}..{num(hi)}"


def _check_ranges(obj: Any, where: str) -> list[str]:
    p = []
    for name, (lo, hi, lo_open) in RANGES.get(type(obj), {}).items():
        value = getattr(obj, name)
        if value is None:
            continue
        if not (lo < value <= hi if lo_open else lo <= value <= hi):
            p.append(f"{_join(where, name)}: {value} is outside {range_text(lo, hi, lo_open)}")
    return p


def _resolve_paths(c: Config, base: Path) -> Config:
    """Relative paths in the file are relative to the file's folder; `~` is the user's home."""

    def fix(value: str | None) -> str | None:
        if not value:
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)

    sources = tuple(replace(s, path=fix(s.path)) for s in c.sources)
    m = c.mqtt
    return replace(
        c, sources=sources, state_dir=fix(c.state_dir), model=replace(c.model, path=fix(c.model.path)),
        mqtt=replace(m, password_file=fix(m.password_file), ca_file=fix(m.ca_file), cert_file=fix(m.cert_file),
                     key_file=fix(m.key_file)),
        zmq=replace(c.zmq, curve_secret_file=fix(c.zmq.curve_secret_file)), clips=replace(c.clips, dir=fix(c.clips.dir)),
        web=replace(c.web, token_file=fix(c.web.token_file)),
    )


def readable_file_problem(path: str) -> str | None:
    """Why `path` cannot be read as a file ("no such file", "is a directory", ...), or None."""
    p = Path(path)
    if p.is_dir():
        return f"{path}: is a directory"
    if not p.exists():
        return f"{path}: no such file"
    if not os.access(p, os.R_OK):
        return f"{path}: not readable (permission denied)"
    return None


def split_listen(listen: str, any_port: bool = False) -> tuple[str, int] | None:
    """`host:port` or `[v6addr]:port` as (host, port), or None if malformed.

    With `any_port`, port 0 (the system picks a free one) is accepted too.
    """
    m = re.match(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]]+)):(\d{1,5})$", listen)
    if not m or not (0 if any_port else 1) <= int(m.group(3)) <= 65535:
        return None
    return (m.group(1) or m.group(2)), int(m.group(3))


def _shown(name: str) -> str:
    """A field's name as written in TOML."""
    return next((alias for alias, target in _TABLE_ALIASES.items() if target == name), name)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _tname(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


def _hname(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(hint, str(hint))

