"""`earshot install-service`: set earshot up as a systemd service in one idempotent step.

What it does, in order (each step is skipped when already done, and printed either way):

1. the system user and group `earshot` (no login, home = the state directory), in group `audio`;
2. the unit `/etc/systemd/system/earshot.service`, its `ExecStart` pointing at this installation;
3. the configuration `/etc/earshot/earshot.toml` from the commented example, never overwritten;
4. the state directory `/var/lib/earshot` (mode 0750, owned by earshot);
5. `systemctl daemon-reload` and `systemctl enable [--now] earshot`.

`--root DIR` installs into another root (an image being built, or a test): users are added with
`useradd --prefix DIR` and the unit is enabled with `systemctl --root=DIR`, which touch nothing
outside DIR. `--dry-run` prints the steps and changes nothing.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

USER = "earshot"
UNIT = "earshot.service"
UNIT_DIR = "etc/systemd/system"
CONFIG_DIR = "etc/earshot"
STATE_DIR = "var/lib/earshot"
_REPO = Path(__file__).resolve().parents[2]


class InstallError(Exception):
    """A step failed or a precondition is missing; one line for the user (exit 1)."""


@dataclass(frozen=True)
class Step:
    """One installation step: what it does (for the log and --dry-run) and how."""

    description: str
    apply: Callable[[], None] | None
    """None when there is nothing to do (already done)."""


def default_exec() -> list[str]:
    """The earshot command of this installation (the console script beside this Python, else `python -m earshot`)."""
    script = Path(sys.executable).parent / "earshot"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "earshot"]


def render_unit(template: str, exec_argv: list[str], config_path: str = "/etc/earshot/earshot.toml") -> str:
    """The unit text with `ExecStart` running `exec_argv run --config config_path`."""
    words = [*exec_argv, "run", "--config", config_path]
    line = "ExecStart=" + " ".join(f'"{w}"' if re.search(r"\s", w) else w for w in words)
    text, n = re.subn(r"(?m)^ExecStart=.*$", lambda _m: line, template)
    if n != 1:
        raise InstallError("the unit template must have exactly one ExecStart= line")
    return text


def _passwd_entry(root: Path, name: str) -> tuple[int, int] | None:
    """(uid, gid) of `name` in ROOT/etc/passwd, or None."""
    try:
        for line in (root / "etc/passwd").read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 4 and parts[0] == name:
                return int(parts[2]), int(parts[3])
    except (OSError, ValueError):
        return None
    return None


def _has_group(root: Path, name: str) -> bool:
    if root == Path("/"):
        try:
            grp.getgrnam(name)
            return True
        except KeyError:
            return False
    try:
        return any(line.split(":")[0] == name for line in (root / "etc/group").read_text().splitlines())
    except OSError:
        return False


def _run(cmd: list[str]) -> None:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise InstallError(f"{cmd[0]} not found; install it or do this step by hand: {' '.join(cmd)}") from None
    except subprocess.TimeoutExpired:
        raise InstallError(f"{' '.join(cmd)} did not finish within 60 s") from None
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()
        raise InstallError(f"{' '.join(cmd)} failed: {why[-1] if why else f'exit code {result.returncode}'}")


def plan(root: Path, exec_argv: list[str], *, unit_template: Path | None = None, config_example: Path | None = None,
         enable: bool = True, start: bool = False) -> list[Step]:
    """The steps to install into `root`, each with nothing to do if it is already done."""
    unit_template = unit_template or _REPO / "systemd" / UNIT
    config_example = config_example or _REPO / "systemd" / "earshot.toml"
    for f in (unit_template, config_example):
        if not f.is_file():
            raise InstallError(f"{f} not found: run install-service from an earshot source checkout "
                               "(or pass --unit/--config-example)")
    system = root == Path("/")
    steps: list[Step] = []
    prefix = [] if system else ["--prefix", str(root)]

    # 1. user
    if _passwd_entry(root, USER):
        steps.append(Step(f"user {USER} exists", None))
    else:
        groups = ["--groups", "audio"] if _has_group(root, "audio") else []
        cmd = ["useradd", *prefix, "--system", "--user-group", "--no-create-home", "--home-dir", f"/{STATE_DIR}",
               "--shell", "/usr/sbin/nologin", "--comment", "earshot sound event detector", *groups, USER]
        note = "" if groups else " (no audio group here: add the user to it once it exists)"
        steps.append(Step(f"create system user: {' '.join(cmd)}{note}", lambda c=cmd: _run(c)))

    # 2. unit
    unit_path = root / UNIT_DIR / UNIT
    unit_text = render_unit(unit_template.read_text(), exec_argv)
    if unit_path.is_file() and unit_path.read_text() == unit_text:
        steps.append(Step(f"unit {unit_path} is up to date", None))
    else:
        what = "update" if unit_path.exists() else "install"

        def write_unit() -> None:
            unit_path.parent.mkdir(parents=True, exist_ok=True)
            unit_path.write_text(unit_text)
            unit_path.chmod(0o644)
        steps.append(Step(f"{what} unit {unit_path} (ExecStart={' '.join(exec_argv)} run ...)", write_unit))

    # 3. config (the operator's file: never overwritten)
    config_path = root / CONFIG_DIR / "earshot.toml"
    if config_path.exists():
        steps.append(Step(f"keep existing configuration {config_path}", None))
    else:
        def write_config() -> None:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config_example, config_path)
            ids = _passwd_entry(root, USER)
            if ids and os.geteuid() == 0:
                os.chown(config_path, 0, ids[1])  # root:earshot 0640: readable by the service, not by others
            config_path.chmod(0o640)
        steps.append(Step(f"install configuration {config_path} (from {config_example.name}, mode 0640)",
                          write_config))

    # 4. state directory
    state = root / STATE_DIR
    def make_state() -> None:
        state.mkdir(parents=True, exist_ok=True)
        ids = _passwd_entry(root, USER)
        if ids and os.geteuid() == 0:
            os.chown(state, ids[0], ids[1])
        state.chmod(0o750)
    ids = _passwd_entry(root, USER)
    if state.is_dir() and (state.stat().st_mode & 0o777) == 0o750 and (ids is None or state.stat().st_uid == ids[0]):
        steps.append(Step(f"state directory {state} exists", None))
    else:
        steps.append(Step(f"state directory {state} (mode 0750, owner {USER})", make_state))

    # 5. systemd
    if enable:
        if system:
            steps.append(Step("systemctl daemon-reload", lambda: _run(["systemctl", "daemon-reload"])))
            cmd = ["systemctl", "enable", *(["--now"] if start else []), UNIT]
        else:
            cmd = ["systemctl", f"--root={root}", "enable", UNIT]
        wanted = root / UNIT_DIR / "multi-user.target.wants" / UNIT
        if not system and wanted.is_symlink():
            steps.append(Step(f"{UNIT} is enabled", None))
        else:
            steps.append(Step(" ".join(cmd), lambda c=cmd: _run(c)))
    return steps


def install_service(root: str | Path = "/", *, dry_run: bool = False, exec_argv: list[str] | None = None,
                    enable: bool = True, start: bool = True, unit_template: Path | None = None,
                    config_example: Path | None = None, out: Callable[[str], None] = print) -> int:
    """Run (or with `dry_run` print) the installation steps; returns 0, raises InstallError on failure."""
    root = Path(root).resolve()
    exec_argv = exec_argv or default_exec()
    system = root == Path("/")
    if system and not dry_run and os.geteuid() != 0:
        raise InstallError("installing the service needs root: sudo earshot install-service (or --dry-run)")
    if re.match(r"^/(home|root|run/user)/", exec_argv[0]):
        out(f"warning: {exec_argv[0]} is under a home directory, which the unit hides (ProtectHome=yes); "
            "install earshot under /opt or /usr/local")
    if re.match(r"^/(tmp|var/tmp)/", exec_argv[0]):
        where = "/var/tmp" if exec_argv[0].startswith("/var/tmp/") else "/tmp"
        out(f"warning: {exec_argv[0]} is under {where}, which the unit replaces with an empty private folder "
            "(PrivateTmp=yes): the service would not find it; install earshot under /opt or /usr/local")
    for step in plan(root, exec_argv, unit_template=unit_template, config_example=config_example,
                     enable=enable, start=start and system):
        if step.apply is None:
            out(f"ok       {step.description}")
        elif dry_run:
            out(f"would    {step.description}")
        else:
            step.apply()
            out(f"done     {step.description}")
    if not dry_run and system:
        out("earshot is installed: edit /etc/earshot/earshot.toml, then systemctl reload earshot; "
            "logs: journalctl -u earshot -f")
    return 0
