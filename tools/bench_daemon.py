#!/usr/bin/env python3
"""Daemon benchmark: what the whole `earshot run` costs, beside what its scoring core costs.

Usage:
    python tools/bench_daemon.py [--streams 1,10,100] [--max] [--seconds 30] [--stress]
                                 [--processes N] [--model PATH] [--json out.json] [--quick]

For each stream count N it starts the real daemon (`python -m earshot run -c <config>`) with N
file sources played at real time in a loop, and the default publishers and endpoints on: MQTT
to a real Mosquitto it starts on loopback, ZeroMQ, Home Assistant discovery, clips (state_dir
in a temporary directory), the Prometheus endpoint and run-time control. After a warm-up it
measures over `--seconds`:

- CPU: utime + stime of the daemon and every process under it (/proc/<pid>/stat), as % of one
  core over the wall time of the window; per stream, and marginal per added stream against
  the smallest count of the same run;
- RSS: the sum of VmRSS over those processes at the end of the window;
- hop lag p99: `earshot_hop_lag_seconds` of every source, scraped from the daemon's metrics
  every `--scrape-s` seconds (a scrape is what Prometheus would do, so it is part of the cost);
- samples lost: `earshot_samples_lost_total` summed over sources, since the daemon started;
- the scorer-only figure for the same N, in the same run: `tools/bench.py`'s many-streams
  worker (log-mel frontend + batched scorer, same runtime and model), so the daemon's overhead
  is a ratio and not an absolute that depends on how busy the host is.

`--max` then raises N in steps of `--step` until a run loses samples or its lag p99 passes
`--max-lag-ms`, and reports the largest N that held. `--stress` runs `stress-ng --cpu <cores>`
beside every daemon run (figures taken under load). The host's load average is printed with
every row: on a shared machine compare only figures of the same run.

`--quick` (1 and 3 streams, 4 s each, no scorer baseline beyond 2 s) is what the test suite
runs to prove the benchmark works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout_s: float, poll_s: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll_s)
    return bool(pred())


# -- processes ---------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return out


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes."""
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def _status_value(path: str, field: str) -> int:
    """The number after `field:` in a /proc status file; 0 when the process or thread has gone."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sleeps(pids: list[int]) -> int:
    """Voluntary context switches so far of every thread of these processes: each is a sleep that
    ends in a wake-up, which on a small or virtual machine costs more than most per-hop Python."""
    total = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        total += sum(_status_value(f"/proc/{p}/task/{t}/status", "voluntary_ctxt_switches") for t in tasks)
    return total


def _rss_mb(pids: list[int]) -> float:
    return sum(_status_value(f"/proc/{p}/status", "VmRSS") for p in pids) / 1024.0  # kB -> MB


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# -- metrics -----------------------------------------------------------------------------------


def _scrape(url: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text -> {metric name: [(labels text, value)]}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        out.setdefault(name, []).append((labels, float(value)))
    return out


def _sum(m: dict, name: str) -> float:
    return sum(v for _, v in m.get(name, []))


# -- one daemon run ----------------------------------------------------------------------------


def _audio(path: Path, seconds: float = 20.0) -> Path:
    """Test audio: a quiet room (-45 dBFS noise, a hum, a soft voice-band murmur), 16 kHz mono, 16-bit.

    Loud enough to pass the level gate, so every hop is scored, but with nothing to detect: the
    cost measured is that of listening, as it is almost all the time (events are rare and cheap).
    """
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(7)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    murmur = np.convolve(rng.standard_normal(n), np.hanning(64) / 32, mode="same") * (np.sin(2 * np.pi * 0.2 * t) > 0)
    x = 0.005 * rng.standard_normal(n) + 0.003 * np.sin(2 * np.pi * 50 * t) + 0.01 * murmur
    sf.write(path, np.clip(x, -1, 1).astype(np.float32), SR, subtype="PCM_16")
    return path


def _config(tmp: Path, n: int, wav: Path, mqtt_port: int, args: argparse.Namespace) -> tuple[Path, str]:
    metrics_port, zmq_port = _free_port(), _free_port()
    lines = ['node = "bench"', f'state_dir = "{tmp / "state"}"', 'log_level = "info"', ""]
    for i in range(n):
        lines += ["[[source]]", f'name = "s{i}"', 'kind = "file"', f'path = "{wav}"', "realtime = true",
                  "loop = true", ""]
    lines += ["[mqtt]", 'host = "127.0.0.1"', f"port = {mqtt_port}", "",
              "[zmq]", f'endpoint = "tcp://127.0.0.1:{zmq_port}"', "",
              "[metrics]", f'listen = "127.0.0.1:{metrics_port}"', "",
              "[clips]", 'listen = "127.0.0.1:0"', ""]
    if args.model:
        lines += ["[model]", f'path = "{Path(args.model).resolve()}"', ""]
    worker = ([f"processes = {args.processes}"] if args.processes is not None else []) + (
        [f"hops_per_pass = {args.hops_per_pass}"] if args.hops_per_pass is not None else [])
    if worker:
        lines += ["[worker]", *worker, ""]
    path = tmp / "earshot.toml"
    path.write_text("\n".join(lines))
    return path, f"http://127.0.0.1:{metrics_port}/metrics"


def _runtime(log: Path) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if "runtime " in line and ("onnx" in line or "torch" in line):
            return "onnx" if "runtime onnx" in line else "torch"
    return "?"


def run_daemon(n: int, wav: Path, mqtt_port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start `earshot run` with n real-time file sources, measure it, stop it."""
    with tempfile.TemporaryDirectory(prefix="earshot-benchd-") as d:
        tmp = Path(d)
        cfg, url = _config(tmp, n, wav, mqtt_port, args)
        log = tmp / "daemon.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        stress = None
        if args.stress:
            stress = subprocess.Popen(["stress-ng", "--cpu", str(os.cpu_count() or 1), "--quiet"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(log, "w") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "earshot", "run", "-c", str(cfg)], stdout=logf,
                                    stderr=subprocess.STDOUT, env=env)
        try:
            def hopping() -> bool:
                if proc.poll() is not None:
                    raise SystemExit(f"earshot run exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    m = _scrape(url)
                except OSError:
                    return False
                return len([v for _, v in m.get("earshot_hops_total", []) if v >= 10]) >= n

            t_start = time.monotonic()
            if not _wait(hopping, timeout_s=60 + n * 0.2, poll_s=0.5):
                raise SystemExit(f"{n} streams: not every source was scored within the start-up time")
            startup_s = time.monotonic() - t_start
            time.sleep(args.warmup)
            pids = _tree(proc.pid)
            load0 = _loadavg()
            c0, z0, w0 = _cpu_s(pids), _sleeps(pids), time.monotonic()
            lags: list[float] = []
            end = w0 + args.seconds
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(args.scrape_s, left))
                m = _scrape(url)
                lags += [v for _, v in m.get("earshot_hop_lag_seconds", [])]
            pids = _tree(proc.pid)
            c1, z1, w1 = _cpu_s(pids), _sleeps(pids), time.monotonic()
            rss = _rss_mb(pids)
            m = _scrape(url)
            load1 = _loadavg()
        finally:
            t_stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            stop_s = time.monotonic() - t_stop
            if stress is not None:
                stress.terminate()
                stress.wait(10)
        import numpy as np

        cpu_pct = 100.0 * (c1 - c0) / (w1 - w0)
        return {
            "streams": n,
            "runtime": _runtime(log),
            "processes": len(pids),
            "cpu_pct": cpu_pct,
            "cpu_pct_per_stream": cpu_pct / n,
            "wakeups_per_s": (z1 - z0) / (w1 - w0),
            "rss_mb": rss,
            "lag_p99_ms": float(np.percentile(lags, 99) * 1e3) if lags else float("nan"),
            "lag_max_ms": float(max(lags) * 1e3) if lags else float("nan"),
            "samples_lost": int(_sum(m, "earshot_samples_lost_total")),
            "hops": int(_sum(m, "earshot_hops_total")),
            "seconds": w1 - w0,
            "startup_s": startup_s,
            "stop_s": stop_s,
            "exit_code": code,
            "loadavg": [load0, load1],
            "stress": bool(args.stress),
        }


# -- scorer-only baseline (tools/bench.py) -------------------------------------------------------


def scorer_only(n: int, runtime: str, models: Path, seconds: float) -> float:
    """% of one core per stream of the frontend + batched scorer alone (tools/bench.py's worker)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EARSHOT_BENCH_MODELS=str(models),
               PYTHONPATH=str(ROOT / "daemon") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    backend = "onnx" if runtime == "onnx" else "torch"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--worker", f"streams:{backend}:{n}",
                           "--stream-seconds", str(seconds)], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"scorer-only bench failed:\n{proc.stderr.strip()[-2000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["batched_pct_per_stream"])


def _models(tmp: Path, args: argparse.Namespace) -> Path:
    """bench.pt / bench.onnx for tools/bench.py: the model the daemon runs."""
    d = tmp / "models"
    d.mkdir()
    if args.model:
        m = Path(args.model).resolve()
        (d / f"bench{m.suffix}").symlink_to(m)
    for suffix in (".pt", ".onnx"):
        if not (d / f"bench{suffix}").exists() and (ROOT / "models" / f"earshot{suffix}").exists():
            (d / f"bench{suffix}").symlink_to(ROOT / "models" / f"earshot{suffix}")
    return d


# -- driver --------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    head = (f"{'streams':>7} {'runtime':>7} {'procs':>5} {'CPU %core':>9} {'%/stream':>8} {'marginal':>8} "
            f"{'scorer %/str':>12} {'overhead':>8} {'wakes/s':>7} {'RSS MB':>7} {'lag p99 ms':>10} {'lost':>6} {'load':>9}")
    lines = [head]
    for r in rows:
        marginal = ((r["cpu_pct"] - base["cpu_pct"]) / (r["streams"] - base["streams"])
                    if r["streams"] > base["streams"] else float("nan"))
        r["marginal_pct_per_stream"] = marginal
        scorer = r.get("scorer_pct_per_stream", float("nan"))
        ratio = r["cpu_pct_per_stream"] / scorer if scorer and scorer == scorer else float("nan")
        r["overhead_ratio"] = ratio
        load = f"{r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f}" + ("*" if r["stress"] else "")
        lines.append(f"{r['streams']:>7} {r['runtime']:>7} {r['processes']:>5} {r['cpu_pct']:>9.2f} "
                     f"{r['cpu_pct_per_stream']:>8.3f} {marginal:>8.3f} {scorer:>12.3f} {ratio:>7.1f}x {r['wakeups_per_s']:>7.0f} "
                     f"{r['rss_mb']:>7.0f} {r['lag_p99_ms']:>10.0f} {r['samples_lost']:>6} {load:>9}")
    lines.append("CPU = daemon + its worker processes, % of one core; marginal = (CPU(N) - CPU(first)) / (N - first);")
    lines.append("wakes/s = voluntary context switches a second, all threads (metrics scrapes included);")
    lines.append("scorer = tools/bench.py frontend + batched scorer per stream, same run; overhead = daemon/scorer per "
                 "stream; load = host 1-min load average before-after (* = stress-ng --cpu beside it)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,10,100", help="stream counts, comma-separated (default 1,10,100)")
    ap.add_argument("--max", action="store_true", help="then raise N by --step until samples are lost or lag is high")
    ap.add_argument("--step", type=int, default=50, help="--max: streams added per step (default 50)")
    ap.add_argument("--max-streams", type=int, default=1000, help="--max: stop searching here (default 1000)")
    ap.add_argument("--max-lag-ms", type=float, default=200.0, help="--max: lag p99 that counts as not holding")
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement window per run (s), default 30")
    ap.add_argument("--warmup", type=float, default=5.0, help="wait after every source is scored (s), default 5")
    ap.add_argument("--scrape-s", type=float, default=2.0, help="metrics scrape interval (s), default 2")
    ap.add_argument("--scorer-seconds", type=float, default=10.0, help="audio per stream of the scorer-only run (s)")
    ap.add_argument("--no-scorer", action="store_true", help="skip the scorer-only baseline")
    ap.add_argument("--stress", action="store_true", help="run stress-ng --cpu <cores> beside every daemon run")
    ap.add_argument("--processes", type=int, help="[worker] processes (default: the daemon's own default)")
    ap.add_argument("--hops-per-pass", type=int, help="[worker] hops_per_pass (default: the daemon's own default)")
    ap.add_argument("--model", help="model file ([model] path; default the shipped model)")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    ap.add_argument("--quick", action="store_true", help="1 and 3 streams, 4 s each: proves the benchmark works")
    args = ap.parse_args(argv)
    if args.quick:
        args.streams, args.seconds, args.warmup, args.scrape_s, args.scorer_seconds = "1,3", 4.0, 1.0, 1.0, 2.0
        args.max = False
    try:
        counts = [int(x) for x in args.streams.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--streams must be comma-separated integers, got {args.streams!r}")
    if not counts or any(c < 1 for c in counts) or args.seconds <= 0:
        ap.error("--streams must be positive integers and --seconds positive")
    if not Path(MOSQUITTO).exists():
        ap.error(f"needs mosquitto ({MOSQUITTO}): apt-get install mosquitto")
    if args.stress and not shutil.which("stress-ng"):
        ap.error("--stress needs stress-ng: apt-get install stress-ng")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="earshot-benchd-") as d:
        tmp = Path(d)
        wav = _audio(tmp / "bench.wav")
        models = _models(tmp, args)
        port = _free_port()
        (tmp / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                                            + ("user root\n" if os.geteuid() == 0 else ""))
        broker = subprocess.Popen([MOSQUITTO, "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            if not _wait(lambda: _connectable(port), 10):
                raise SystemExit("mosquitto did not start")

            def one(n: int) -> dict[str, Any]:
                r = run_daemon(n, wav, port, args)
                if not args.no_scorer:
                    r["scorer_pct_per_stream"] = scorer_only(n, r["runtime"], models, args.scorer_seconds)
                print(f"  {n} streams: {r['cpu_pct']:.2f} % of a core, {r['rss_mb']:.0f} MB, "
                      f"lag p99 {r['lag_p99_ms']:.0f} ms, {r['samples_lost']} lost", file=sys.stderr, flush=True)
                return r

            for n in counts:
                rows.append(one(n))
            held = None
            if args.max:
                n = max(counts)
                while n + args.step <= args.max_streams:
                    n += args.step
                    r = one(n)
                    rows.append(r)
                    if r["samples_lost"] or not r["lag_p99_ms"] <= args.max_lag_ms:
                        break
                ok = [r["streams"] for r in rows if not r["samples_lost"] and r["lag_p99_ms"] <= args.max_lag_ms]
                held = max(ok) if ok else None
        finally:
            broker.terminate()
            broker.wait(10)
    print(f"earshot daemon bench: {args.seconds:g} s per run after {args.warmup:g} s warm-up, real-time file "
          f"sources, MQTT + ZeroMQ + clips + metrics + Home Assistant on{', stress-ng beside it' if args.stress else ''}")
    print(_table(rows))
    if args.max:
        print(f"most streams held (no samples lost, lag p99 <= {args.max_lag_ms:g} ms): {held}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": vars(args) | {"json": str(args.json)}}, indent=2,
                                        default=str))
    return 0


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
