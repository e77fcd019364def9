"""earshot command line: run the daemon, detect in files, list devices, watch events, check a config.

Exit codes: 0 success, 1 runtime failure (missing device or model, a dead worker), 2 invalid
configuration or arguments. User errors print one line, never a traceback.
"""

from __future__ import annotations

import os

# One BLAS thread, set before numpy loads OpenBLAS: the daemon's matrix products are a hop's
# frames (10 x 257 by 257 x 64), far too small to split, and idle BLAS threads spin, which on a
# busy machine costs more CPU than the products. Worker processes inherit it. Cores are used
# by worker processes instead ([worker]).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import replace
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, SourceConfig, StdoutConfig, readable_file_problem
from .config import load as load_config

_LOGGER = logging.getLogger("earshot")

DEFAULT_CONFIG = Path("/etc/earshot/earshot.toml")
PLOT_TYPES = (".png", ".svg", ".pdf")


def _setup_logging(level: str) -> None:
    # journald stamps every line itself; a terminal user wants the time.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


def _config_path(path: str | None) -> str | None:
    if path is None and DEFAULT_CONFIG.is_file():
        return str(DEFAULT_CONFIG)
    return path


def _config(path: str | None) -> Config:
    return load_config(_config_path(path))


def model_file(config: Config) -> Path:
    """The model file to run: `[model] path`, else the shipped model on the default runtime.

    The shipped model comes as a torch checkpoint and as its ONNX export (same network, tested
    equal). Where onnxruntime is installed the export runs: it never imports torch, so a daemon
    takes about half the memory (about 140 MB against 320 MB) and scores a stream in about half
    the CPU time. Without onnxruntime the checkpoint runs on torch.
    """
    import importlib.util

    from .model import default_model_path

    if config.model.path:
        return Path(config.model.path)
    path = default_model_path()
    onnx = path.with_suffix(".onnx")
    if onnx.is_file() and importlib.util.find_spec("onnxruntime") is not None:
        return onnx
    return path


def _load_model(config: Config):
    """The configured model (`model_file`): a .pt checkpoint runs on torch, an .onnx export on ONNX Runtime.

    The one place the CLI loads a model, checked against the configuration (labels, window) by the
    same function for every command, so `check-config` refuses what `run` would refuse, with the same line.
    """
    from .model import load_model
    from .preflight import check

    path = model_file(config)
    loaded = load_model(path, threads=config.model.threads)
    _LOGGER.debug("model %s: runtime %s", path, loaded.backend)
    check(config, loaded)
    return loaded


def cmd_run(args: argparse.Namespace) -> int:
    from .capture import has_input_device
    from .detect import make_rules
    from .integrations import attach
    from .metrics import attach_metrics
    from .preflight import check
    from .publish import Fanout, make_publishers
    from .service import Service, handle_signals

    config = _config(args.config)
    _setup_logging("debug" if args.debug else config.log_level)
    path = _config_path(args.config)
    stop, reload_requested = threading.Event(), threading.Event()
    handle_signals(stop, reload_requested if path else None)  # a SIGTERM during start-up is a clean stop too
    if args.demo or (args.demo_if_no_device and any(s.kind == "mic" for s in config.active_sources)
                     and not has_input_device()):
        if not args.demo:
            _LOGGER.warning("no audio capture device found: running the demo scene instead "
                            "(generated audio with alarms, glass breaks and gunshots, played at real time)")
        config = config.with_sources((SourceConfig(name="demo", kind="demo", loop=True),))
        config = replace(config, stdout=StdoutConfig(enabled=True))
    if args.stdout:
        config = replace(config, stdout=StdoutConfig(enabled=True))
    loaded = _load_model(config)  # checked against the config before any device opens
    rules = make_rules(loaded.labels, loaded.thresholds, config.detect)
    _LOGGER.info("earshot %s, model %s (%s, runtime %s); thresholds %s", __version__,
                 loaded.provenance.get("name", "earshot"), model_file(config).name, loaded.backend,
                 ", ".join(f"{k} {r.threshold:.2f}" for k, r in rules.items()))
    publisher = Fanout(make_publishers(config))
    service = Service(config, loaded, publisher, reload_config=(lambda: check(load_config(path), loaded)) if path else None,
                      stop=stop, reload_requested=reload_requested, model_path=model_file(config))
    attach_metrics(service)  # Prometheus endpoint ([metrics]); logs and carries on if it cannot serve
    try:
        integrations = attach(service, config, publisher)  # control, Home Assistant, clips, score feed
    except BaseException:
        publisher.close(timeout_s=1.0)
        raise
    try:
        service.start()
    except BaseException:
        integrations.close(1.0)
        publisher.close(timeout_s=1.0)
        raise
    _next_steps(config, path, rules)
    try:
        return service.supervise()
    finally:
        integrations.close()  # writes clips still waiting for post-roll


def _detect_overrides(config: Config, args: argparse.Namespace) -> Config:
    """`detect --model/--labels/--threshold` on top of the configuration, checked like the file's values."""
    from .config import check

    problems = []
    detect, model = config.detect, config.model
    if args.model:
        model = replace(model, path=str(Path(args.model).expanduser().absolute()))
    if args.labels:
        detect = replace(detect, labels=tuple(x.strip() for x in args.labels.split(",") if x.strip()))
    thresholds = dict(detect.thresholds)
    for item in args.threshold or []:
        label, eq, value = item.partition("=")
        try:
            thresholds[label.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq or not label.strip():
            problems.append(f"--threshold {item!r}: expected LABEL=NUMBER, e.g. glass_break=0.8")
    config = replace(config, model=model, detect=replace(detect, thresholds=thresholds))
    problems += [p for p in check(config) if p.startswith(("model.", "detect."))]
    if problems:
        raise ConfigError(problems)
    return config


def _next_steps(config: Config, path: str | None, rules: dict) -> None:
    """After start-up, say where events go and what to run next: the first thing a new user needs."""
    where = []
    if config.stdout.enabled:
        where.append("standard output (JSON lines)")
    if config.zmq.enabled:
        where.append(f"ZeroMQ {config.zmq.endpoint}")
    if config.mqtt.enabled:
        where.append(f"MQTT {config.mqtt.host}:{config.mqtt.port} topic {config.mqtt.topic_prefix}/{config.node}/<source>/event")
    prog = sys.argv[0] if Path(sys.argv[0]).name == "earshot" else "earshot"
    _LOGGER.info("listening for %s; events go to %s", ", ".join(rules) or "no label",
                 ", ".join(where) or "nowhere: enable [stdout], [zmq] or [mqtt]")
    _LOGGER.info("configuration: %s", path or "none (built-in defaults); copy systemd/earshot.toml and pass -c FILE")
    mics = [s for s in config.active_sources if s.kind == "mic"]
    pick = (f"; pick a microphone: `{prog} devices`, then device = INDEX or \"part of its name\" under [[source]]"
            f" in {path or 'your config file'}") if mics else ""
    _LOGGER.info("next: `%s tail` prints events from another terminal; `%s monitor` shows levels and scores live%s",
                 prog, prog, pick)


def cmd_detect(args: argparse.Namespace) -> int:
    from .capture import CaptureError, iter_file_blocks
    from .offline import BLOCK_S, detect_blocks, detections

    config = _detect_overrides(_config(args.config), args)
    _setup_logging("debug" if args.debug else "warning")
    loaded = _load_model(config)
    failed = 0
    for file in args.files:
        found: list = []
        hops: list = []
        try:
            blocks = iter_file_blocks(file, loaded.frontend.sample_rate, block_s=BLOCK_S)
            events = detect_blocks(blocks, loaded, config.detect, config.frontend, source=Path(file).name, hops=hops)
            found = detections(file, events)
        except CaptureError as e:
            print(f"earshot: {e}", file=sys.stderr)
            failed += 1
            continue
        for d in found:
            print(json.dumps(d.to_dict()) if args.format == "jsonl" else d.to_dcase(), flush=True)
        # Per file, on stderr so stdout stays pure jsonl/dcase: a clean file is not a skipped one.
        seconds = hops[-1].t_end if hops else 0.0
        what = f"{len(found)} detection(s)" if hops else "too short to score (under 25 ms of audio)"
        print(f"earshot: {file}: {seconds:.1f} s, {len(hops)} window(s) scored, {what}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def cmd_devices(_args: argparse.Namespace) -> int:
    from .capture import list_devices

    print(list_devices())
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from .tail import tail

    _setup_logging("warning")
    username, password_file = None, args.password_file
    if args.zmq is None and args.mqtt is None:
        config = _config(args.config)
        args.zmq = config.zmq.endpoint if config.zmq.enabled else None
        args.mqtt = None if args.zmq else f"mqtt://{config.mqtt.host}:{config.mqtt.port}"
        username, password_file = config.mqtt.username, password_file or config.mqtt.password_file
    return tail(args.mqtt, args.zmq, node=args.node, raw_json=args.json, username=username,
                password_file=password_file)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .model.onnx import main as export_main

    return export_main([args.checkpoint, args.output])


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    loaded = _load_model(config)  # what `run` would refuse (model file, labels, window) is refused here first
    sources = ", ".join(f"{s.name} ({s.kind})" for s in config.active_sources)
    labels = ", ".join(config.detect.labels or loaded.labels)
    print(f"{args.file}: OK; node {config.node}; sources: {sources}; "
          f"model {loaded.provenance.get('name', 'earshot')} ({loaded.backend}); labels: {labels}")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from .monitor import LocalFeed, MonitorState, ZmqFeed, run_monitor

    _setup_logging("debug" if args.debug else "error")  # log lines would tear the screen
    if args.zmq:
        try:
            feed = ZmqFeed(args.zmq, args.source, MonitorState)
        except ValueError as e:
            print(f"earshot: {e}", file=sys.stderr)
            return 2
    else:
        config = _config(args.config)
        if args.file and (why := readable_file_problem(args.file)):
            print(f"earshot: cannot read {why}", file=sys.stderr)
            return 1
        if args.file:
            source = SourceConfig(name="file", kind="file", path=args.file, realtime=not args.fast, loop=args.loop)
        elif args.device is not None:
            device = int(args.device) if args.device.isdigit() else args.device
            source = SourceConfig(name="mic", kind="mic", device=device)
        elif args.demo:
            source = SourceConfig(name="demo", kind="demo", loop=True)
        else:
            chosen = [s for s in config.active_sources if args.source in (None, s.name)]
            if not chosen:
                print(f"earshot: no enabled source named {args.source!r} in the configuration", file=sys.stderr)
                return 2
            source = chosen[0]
        feed = LocalFeed(config, _load_model(config), source, MonitorState)
    return run_monitor(feed, color=False if args.no_color else None, duration_s=args.duration,
                       exit_at_end=args.exit_at_end)


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import PlotError, plot_file

    config = _config(args.config)
    _setup_logging("debug" if args.debug else "warning")
    out = Path(args.output) if args.output else Path(Path(args.file).with_suffix(".png").name)
    if not out.suffix:
        out = out.with_suffix(".png")  # and say so: the file written is the one reported
    if out.suffix.lower() not in PLOT_TYPES:
        print(f"earshot: -o {out}: cannot write {out.suffix!r} images; use one of {', '.join(PLOT_TYPES)}",
              file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"earshot: -o {out}: no such directory {out.parent}", file=sys.stderr)
        return 2
    loaded = _load_model(config)
    try:
        analysis = plot_file(args.file, out, loaded, config.detect, config.frontend, dpi=args.dpi)
    except PlotError as e:
        print(f"earshot: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the folder is read-only, the disk is full, ...
        print(f"earshot: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    n = sum(1 for e in analysis.events if e.type == "start")
    print(f"{out}: {analysis.samples.size / analysis.sample_rate:.1f} s, {len(analysis.hops)} hops, {n} detection(s)")
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from .install import InstallError, install_service

    try:
        return install_service(args.root, dry_run=args.dry_run, exec_argv=[args.exec] if args.exec else None,
                               enable=not args.no_enable, start=not args.no_start)
    except InstallError as e:
        print(f"earshot: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"earshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help=f"TOML configuration (default {DEFAULT_CONFIG} if it exists)")
        p.add_argument("--debug", action="store_true", help="verbose logging")

    p = sub.add_parser("run", help="run the detector daemon")
    common(p)
    p.add_argument("--demo", action="store_true", help="listen to the generated demo scene instead of the sources")
    p.add_argument("--demo-if-no-device", action="store_true",
                   help="fall back to the demo scene when no capture device exists")
    p.add_argument("--stdout", action="store_true", help="also print events as JSON lines")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("detect", help="detect events in audio files, as fast as the CPU allows")
    common(p)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--format", choices=("jsonl", "dcase"), default="jsonl",
                   help="jsonl: one JSON object per event; dcase: file<TAB>onset<TAB>offset<TAB>label")
    p.add_argument("--model", metavar="PATH", help="model file (.pt or .onnx) instead of the configured one")
    p.add_argument("--labels", metavar="A,B", help="report only these labels (comma-separated)")
    p.add_argument("--threshold", action="append", metavar="LABEL=X",
                   help="start threshold of a label, in (0, 1); repeat for several labels")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("devices", help="list audio capture devices")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("tail", help="print events from a running daemon (ZeroMQ or MQTT)")
    p.add_argument("-c", "--config", help="read the endpoints from this configuration")
    p.add_argument("--zmq", metavar="ENDPOINT", help="ZeroMQ endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--mqtt", metavar="URL", help="MQTT broker, e.g. mqtt://localhost:1883 or mqtt://user@host "
                   "(never a password here: see --password-file)")
    p.add_argument("--password-file", metavar="FILE",
                   help="MQTT password: first line of FILE (else $EARSHOT_MQTT_PASSWORD)")
    p.add_argument("--node", default="+", help="only this node's events (MQTT)")
    p.add_argument("--json", action="store_true", help="print the raw JSON payloads")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("export-onnx", help="export a checkpoint to ONNX (runs without torch; needs the onnx extra)")
    p.add_argument("checkpoint", help="the .pt checkpoint")
    p.add_argument("output", help="the .onnx file to write")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("monitor", help="live terminal view: level, spectrogram, scores, events")
    common(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--file", metavar="FILE", help="analyse an audio file, played at real time")
    where.add_argument("--device", metavar="DEV", help="analyse a microphone: PortAudio index or part of its name")
    where.add_argument("--demo", action="store_true", help="analyse the generated demo scene")
    where.add_argument("--zmq", metavar="ENDPOINT",
                       help="watch a running daemon's score feed, e.g. tcp://127.0.0.1:5556 (no model loaded here)")
    p.add_argument("--source", metavar="NAME", help="which source to show (default: the first)")
    p.add_argument("--fast", action="store_true", help="--file: as fast as the CPU allows, not at real time")
    p.add_argument("--loop", action="store_true", help="--file: start again at the end")
    p.add_argument("--no-color", action="store_true", help="shading characters only (also: NO_COLOR=1)")
    p.add_argument("--duration", type=float, metavar="S", help="quit after S seconds")
    p.add_argument("--exit-at-end", action="store_true", help="quit when a file ends (default: keep the last view)")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("plot", help="plot waveform, level, spectrogram, scores and detections of a recording")
    common(p)
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="OUT", help="image to write (.png, .svg, .pdf); default FILE.png here")
    p.add_argument("--dpi", type=int, default=80, help="resolution of the 12x10 inch figure (default 80)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("install-service", help="install the systemd service: user, unit, config, state directory")
    p.add_argument("--root", default="/", help="install into this root directory instead of / (images, tests)")
    p.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    p.add_argument("--exec", metavar="PATH", help="earshot executable for ExecStart (default: this installation's)")
    p.add_argument("--no-enable", action="store_true", help="do not enable the unit")
    p.add_argument("--no-start", action="store_true", help="enable but do not start it now")
    p.set_defaults(func=cmd_install_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .capture import CaptureError
    from .model import CheckpointError
    from .publish import PublishError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"earshot: {e}", file=sys.stderr)
        return 2
    except (CaptureError, CheckpointError, PublishError) as e:
        print(f"earshot: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
