"""The systemd unit and its installer: the unit passes `systemd-analyze verify`, its exposure score
from `systemd-analyze security` stays at 2.0 or lower while keeping what the daemon needs (sound
devices, network, notify, watchdog), and `earshot install-service --root` creates the user, unit,
configuration, state directory and enablement link in a scratch root, idempotently."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from earshot.install import render_unit

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "earshot.service"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (apt install systemd)")
needs_useradd = pytest.mark.skipif(shutil.which("useradd") is None or shutil.which("systemctl") is None,
                                   reason="useradd/systemctl not installed")


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _scratch_root(tmp_path: Path) -> Path:
    """A root with just enough /etc for useradd --prefix: root, and an audio group."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\naudio:x:29:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\naudio:*::\n")
    for f in ("shadow", "gshadow"):
        (root / "etc" / f).chmod(0o600)
    return root


def _install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "earshot", "install-service", *args], capture_output=True,
                          text=True, timeout=60)


def test_unit_keeps_what_the_daemon_needs():
    """Type=notify with a watchdog, the earshot user in the audio group, reload by SIGHUP, the sound
    devices allowed, and both local and internet sockets (PulseAudio, notify, MQTT, ZeroMQ, metrics)."""
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert int(d["WatchdogSec"][0]) >= 10
    assert d["User"] == ["earshot"] and d["SupplementaryGroups"] == ["audio"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "/dev/snd rw" in d["DeviceAllow"] and "char-alsa rw" in d["DeviceAllow"]
    families = d["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert "PrivateNetwork" not in d and d.get("PrivateDevices", ["no"]) == ["no"]
    assert d["StateDirectory"] == ["earshot"] and d["Restart"] == ["on-failure"]


@needs_analyze
def test_exposure_is_two_or_lower(tmp_path):
    """`systemd-analyze security --offline` rates the unit at 2.0 or lower ("OK")."""
    unit = tmp_path / "earshot.service"
    shutil.copy(UNIT, unit)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    m = re.search(r"Overall exposure level for earshot\.service: (\d+\.\d+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, result.stdout


@needs_analyze
@needs_useradd
def test_installed_unit_verifies(tmp_path):
    """The unit as installed (ExecStart pointing at this installation) passes `systemd-analyze verify`."""
    root = _scratch_root(tmp_path)
    result = _install("--root", str(root))
    assert result.returncode == 0, result.stderr
    unit = root / "etc/systemd/system/earshot.service"
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stderr
    assert "earshot.service" not in verify.stderr, verify.stderr


@needs_useradd
def test_install_service_into_a_root(tmp_path):
    """--root creates the system user (in audio), installs the unit with ExecStart at this installation,
    the configuration (0640, never overwritten), the state directory (0750, owned by earshot) and the
    enablement link; a second run changes nothing and says so."""
    root = _scratch_root(tmp_path)
    result = _install("--root", str(root))
    assert result.returncode == 0, result.stderr
    passwd = (root / "etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("earshot:"))
    uid = int(entry.split(":")[2])
    assert entry.endswith(":/var/lib/earshot:/usr/sbin/nologin")
    assert re.search(r"^audio:x:29:.*earshot", (root / "etc/group").read_text(), re.M)
    unit = (root / "etc/systemd/system/earshot.service").read_text()
    exe = Path(sys.executable).parent / "earshot"
    assert f"ExecStart={exe} run --config /etc/earshot/earshot.toml" in unit
    config = root / "etc/earshot/earshot.toml"
    assert config.read_text() == (ROOT / "systemd/earshot.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    state = root / "var/lib/earshot"
    assert state.stat().st_mode & 0o777 == 0o750 and state.stat().st_uid == uid
    link = root / "etc/systemd/system/multi-user.target.wants/earshot.service"
    assert link.is_symlink()

    config.write_text("# edited by the operator\n")
    again = _install("--root", str(root))
    assert again.returncode == 0, again.stderr
    assert "done" not in again.stdout and again.stdout.count("ok ") == 5, again.stdout
    assert config.read_text() == "# edited by the operator\n"


def test_dry_run_changes_nothing(tmp_path):
    """--dry-run prints every step and creates no file."""
    root = tmp_path / "empty"
    root.mkdir()
    result = _install("--root", str(root), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("would ") == 5, result.stdout
    assert "useradd" in result.stdout and "systemctl" in result.stdout
    assert list(root.iterdir()) == []


def test_system_install_needs_root_or_dry_run():
    """Installing into / as an ordinary user is one clear line (exit 1), not a traceback."""
    if sys.platform != "linux" or __import__("os").geteuid() == 0:
        pytest.skip("runs as root here: a real install would modify this machine")
    result = _install()
    assert result.returncode == 1 and "needs root" in result.stderr


def test_render_unit_quotes_paths_with_spaces():
    """An installation path with a space is quoted in ExecStart, and only ExecStart changes."""
    template = UNIT.read_text()
    text = render_unit(template, ["/opt/my earshot/bin/earshot"])
    assert 'ExecStart="/opt/my earshot/bin/earshot" run --config /etc/earshot/earshot.toml' in text
    assert [a for a in template.splitlines() if not a.startswith("ExecStart=")] == \
        [b for b in text.splitlines() if not b.startswith("ExecStart=")]
