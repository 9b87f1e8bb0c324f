"""Content digests of files: integrity of model files and downloads, identity of duplicate images."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """Hex digest of the file's bytes, read in 1 MiB chunks (model files are hundreds of MB)."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
