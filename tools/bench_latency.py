#!/usr/bin/env python3
"""End-to-end latency: from a sound's onset in the audio to its MQTT `start` event at a subscriber.

Usage: python tools/bench_latency.py [--seconds 120] [--model PATH] [--confirm 1,2] [--json out.json]

What it does, with real parts only:
1. starts `mosquitto` on a free loopback port;
2. starts one `python -m earshot run` per `--confirm` value (detect.confirm_hops), each with a
   `stdin` source (raw s16le mono 16 kHz) and MQTT to that broker, and waits for each to publish
   its retained `online` status;
3. writes a generated scene (`earshot.synth.scene`, known onsets) to every daemon's stdin in
   10 ms pieces paced at real time, recording the monotonic time at which each piece was
   written;
4. subscribes to `earshot/+/+/event`; for each `start` event it takes the ground-truth sound
   of the same label nearest its estimated onset (within 1 s) and reports
   latency = arrival time - write time of the sound's first sample.

It also scores the same audio offline (same model, `score_windows`) to split the latency into
what the model needs (the end of the first hop, or of `confirm_hops` consecutive hops, whose score
passes the threshold: window position and confirmation) and what the pipeline adds (capture,
frontend, inference, publishing, MQTT delivery).

Model: --model, else models/earshot.pt if present, else the tiny test model trained on the
synthetic sounds (tests/tinymodel.py, about a minute on one core, cached under ~/.cache/earshot).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from earshot import synth  # noqa: E402

SR = 16000
PIECE = 160  # samples per stdin write: 10 ms, so onset write times are known to 10 ms
MOSQUITTO = "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    """mosquitto on a free loopback port, anonymous, no persistence; returns (process, port)."""
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    if not _wait(accepting, 10.0):
        proc.kill()
        raise SystemExit(f"mosquitto did not start on port {port}")
    return proc, port


def _default_model() -> Path:
    """models/earshot.pt if shipped, else the tiny synthetic-sound model (trained once, cached)."""
    shipped = REPO / "models" / "earshot.pt"
    if shipped.is_file():
        return shipped
    import torch

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "earshot"
    path = cache / f"bench-tiny-torch{torch.__version__}.pt"
    if not path.is_file():
        print(f"training the tiny test model into {path} (about a minute)...", file=sys.stderr)
        sys.path.insert(0, str(REPO / "tests"))
        sys.path.insert(0, str(REPO / "tools"))
        from tinymodel import train_tiny_checkpoint

        torch.set_num_threads(1)
        train_tiny_checkpoint(path)
    return path


class _Collector:
    """MQTT subscriber recording (arrival monotonic time, topic, payload) of every message."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"latency-{os.getpid()}")
        self.client.on_connect = lambda c, *_: c.subscribe([("earshot/+/+/event", 1), ("earshot/+/status", 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, msg) -> None:  # noqa: ANN001
        t = time.monotonic()
        with self.lock:
            self.messages.append((t, msg.topic, bytes(msg.payload)))

    def snapshot(self) -> list[tuple[float, str, bytes]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _model_bound(model_path: Path, audio: np.ndarray, truth: list, confirm: int) -> list[float | None]:
    """Per truth sound: end of the first run of `confirm` hops scoring above threshold, minus its onset (s)."""
    from earshot.model import load_model
    from earshot.features import features

    m = load_model(model_path)
    p = m.frontend
    ends, scores = m.score_windows(features(audio, p), p.chunk_frames, 10)
    t_end = p.samples_for(ends) / p.sample_rate  # works on an array of frame indices too
    out: list[float | None] = []
    for onset, offset, label in truth:
        col = scores[:, m.labels.index(label)] >= m.thresholds[label]
        hit = None
        for k in np.flatnonzero((t_end > onset) & (t_end < offset + 1.0)):
            if k + confirm <= len(col) and col[k: k + confirm].all():
                hit = float(t_end[k + confirm - 1] - onset)
                break
        out.append(hit)
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"n": len(xs), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "min_ms": float(a.min()), "max_ms": float(a.max())} if len(xs) else {"n": 0}


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; print p50/p95 per confirm_hops value."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="scene length played at real time (s), default 120")
    ap.add_argument("--seed", type=int, default=11, help="scene seed (default 11)")
    ap.add_argument("--model", type=Path, help="model file (.pt or .onnx); default: see the module docstring")
    ap.add_argument("--confirm", default="1,2", help="detect.confirm_hops values, one daemon each (default 1,2)")
    ap.add_argument("--json", type=Path, help="also write the figures and every matched event here")
    args = ap.parse_args(argv)
    confirms = [int(x) for x in args.confirm.split(",")]
    model = args.model or _default_model()
    audio, truth = synth.scene(sr=SR, duration_s=args.seconds, seed=args.seed)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    onset_samples = [int(round(on * SR)) for on, _, _ in truth]

    with tempfile.TemporaryDirectory(prefix="earshot-latency-") as tmp:
        work = Path(tmp)
        broker, port = _start_broker(work)
        sub = _Collector(port)
        daemons: dict[str, subprocess.Popen] = {}
        try:
            env = dict(os.environ, PYTHONUNBUFFERED="1",
                       PYTHONPATH=str(REPO / "daemon") + os.pathsep + os.environ.get("PYTHONPATH", ""))
            for c in confirms:
                node = f"confirm{c}"
                cfg = work / f"{node}.toml"
                cfg.write_text(
                    f'node = "{node}"\n[[source]]\nname = "lat"\nkind = "stdin"\n[model]\npath = "{model}"\n'
                    f"[detect]\nconfirm_hops = {c}\n"
                    f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n[zmq]\nenabled = false\n'
                )
                daemons[node] = subprocess.Popen(
                    [sys.executable, "-m", "earshot", "run", "-c", str(cfg)], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=open(work / f"{node}.log", "w"), env=env,
                )
            online = lambda: {t.split("/")[1] for _, t, p in sub.snapshot() if t.endswith("/status") and p == b"online"}  # noqa: E731
            if not _wait(lambda: set(daemons) <= online(), 60.0):
                logs = "\n".join((work / f"{n}.log").read_text()[-2000:] for n in daemons)
                raise SystemExit(f"daemons did not come online within 60 s:\n{logs}")

            # Pace at real time: piece k is written at t0 + k * 10 ms (never earlier).
            n_pieces = -(-len(audio) // PIECE)
            written = np.zeros(n_pieces)
            t0 = time.monotonic() + 0.2
            for k in range(n_pieces):
                delay = t0 + k * PIECE / SR - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                chunk = pcm[2 * k * PIECE: 2 * (k + 1) * PIECE]
                for proc in daemons.values():
                    proc.stdin.write(chunk)
                    proc.stdin.flush()
                written[k] = time.monotonic()
            time.sleep(3.0)  # let the last events arrive
            for proc in daemons.values():
                proc.stdin.close()
            for proc in daemons.values():
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait(timeout=5)
        finally:
            for proc in daemons.values():
                if proc.poll() is None:
                    proc.kill()
            sub.close()
            broker.terminate()
            broker.wait(timeout=5)

    messages = sub.snapshot()
    report: dict[str, Any] = {"model": str(model), "seconds": args.seconds, "truth": len(truth), "runs": {}}
    print(f"earshot end-to-end latency: {args.seconds:g} s scene (seed {args.seed}, {len(truth)} sounds) "
          f"at real time -> stdin -> daemon -> MQTT (mosquitto, loopback) -> subscriber; model {model}")
    print(f"{'confirm_hops':>12} {'matched':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} "
          f"{'model-bound p50':>16} {'pipeline p50':>13} {'pipeline p95':>13} {'unmatched starts':>17}")
    for c in confirms:
        node = f"confirm{c}"
        bound = _model_bound(model, audio, truth, c)
        starts = [(t, json.loads(p)) for t, topic, p in messages
                  if topic.startswith(f"earshot/{node}/") and topic.endswith("/event")]
        starts = [(t, e) for t, e in starts if e["type"] == "start"]
        matched: dict[int, dict[str, Any]] = {}
        unmatched = 0
        for t, e in starts:
            cands = [i for i, (on, _off, lab) in enumerate(truth) if lab == e["label"] and abs(on - e["onset"]) <= 1.0]
            if not cands:
                unmatched += 1
                continue
            i = min(cands, key=lambda j: abs(truth[j][0] - e["onset"]))
            if i in matched:
                unmatched += 1
                continue
            onset_written = written[onset_samples[i] // PIECE]
            matched[i] = {"label": e["label"], "onset_s": truth[i][0], "latency_s": t - onset_written,
                          "model_bound_s": bound[i]}
        lat = [m["latency_s"] for m in matched.values()]
        pipe = [m["latency_s"] - m["model_bound_s"] for m in matched.values() if m["model_bound_s"] is not None]
        mb = [b for i, b in enumerate(bound) if b is not None and i in matched]
        s, sp, sb = _stats(lat), _stats(pipe), _stats(mb)
        report["runs"][str(c)] = {"latency": s, "pipeline": sp, "model_bound": sb, "unmatched_starts": unmatched,
                                  "events": sorted(matched.values(), key=lambda m: m["onset_s"])}
        if s["n"]:
            print(f"{c:>12} {s['n']:>4}/{len(truth):<3} {s['p50_ms']:>8.0f} {s['p95_ms']:>8.0f} {s['max_ms']:>8.0f} "
                  f"{sb.get('p50_ms', float('nan')):>16.0f} {sp.get('p50_ms', float('nan')):>13.0f} "
                  f"{sp.get('p95_ms', float('nan')):>13.0f} {unmatched:>17}")
        else:
            print(f"{c:>12} {0:>4}/{len(truth):<3} (no start event matched a sound)")
    print("latency = MQTT arrival - wall time the sound's first sample was written to the daemon's stdin;")
    print("model-bound = end of the first hop (confirm_hops consecutive hops) scoring above threshold - onset,")
    print("from the same model offline; pipeline = latency - model-bound (capture, frames, inference, MQTT).")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
