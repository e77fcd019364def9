"""The state directory: created private (0700) whatever the umask, since it holds the MQTT spool
(event payloads), run-time settings and evidence clips.

A directory that already exists is left as it is: an administrator (or systemd's
`StateDirectoryMode=`) may have chosen its mode on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
"""Mode of the directories earshot creates."""
FILE_MODE = 0o600
"""Mode of the files earshot creates in them."""


def ensure_private_dir(path: str | os.PathLike) -> Path:
    """Create `path` and any missing parents with mode 0700 (not umask-dependent); returns it.

    Raises OSError like `Path.mkdir` when a directory cannot be created.
    """
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        # mkdir's mode is masked by the umask; chmod is not.
        os.chmod(d, DIR_MODE)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    return path


def create_private_file(path: str | os.PathLike) -> None:
    """Create `path` empty with mode 0600 if it does not exist; make an existing one 0600 (best effort)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        try:
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, FILE_MODE)
        except OSError:
            pass  # not ours to change (another owner): leave it
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
