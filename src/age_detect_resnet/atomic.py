"""Atomic file writes: a kill during a save never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def unwritable_reason(folder: Path) -> str | None:
    """Why files could not be written into `folder`, made where missing as `atomic_path` makes it: a file
    where it or a folder above it should be, or the nearest existing folder not writable; None where they
    can. Commands check their output folders with it before long work, so as not to fail at the save."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into the folder {existing}"
    return None


def _new_temporary(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file in `folder`, created with the permissions any new file gets there (0666 less
    the umask). tempfile.mkstemp would make it 0600, and the rename would pass that on: checkpoints,
    exports and reports that no one else on the machine (a serving account, a colleague) could read."""
    while True:
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename. `suffix`
    ends the temporary name, for writers that choose the format by it (OpenCV's video writer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path.parent, f".{path.name}.", suffix)
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        # A writer may have replaced the file with one of its own making (safetensors' save_file leaves
        # it 0600): the saved file gets the permissions a new file gets here, whoever wrote it.
        if tmp.stat().st_mode & 0o777 != mode:
            tmp.chmod(mode)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
