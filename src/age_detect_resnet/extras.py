"""The package's optional parts: which extra of `pyproject.toml` brings each module they import, and the
one line that tells a user how to install it. `pip install .` leaves them out; a command that needs
one says so instead of failing with a traceback."""

from __future__ import annotations

# top-level module -> the extra that installs it (pyproject.toml's [project.optional-dependencies])
EXTRA_OF_MODULE = {
    "fastapi": "web",
    "uvicorn": "web",
    "starlette": "web",
    "anyio": "web",
    "multipart": "web",
    "python_multipart": "web",
    "onnx": "export",
    "onnxscript": "export",
    "pillow_heif": "heic",
    "tensorboard": "tensorboard",
}


def install_command(extra: str) -> str:
    return f"pip install 'age-detect-resnet[{extra}]'"


def missing_extra(err: ImportError) -> str | None:
    """The extra whose absence raised `err`, or None where `err` is about any other module."""
    name = getattr(err, "name", None) or ""
    return EXTRA_OF_MODULE.get(name.split(".")[0])


def missing_extra_message(err: ImportError, what: str) -> str | None:
    """`what` (e.g. "age-detect serve") needs an extra that is not installed: the line saying which and
    how to install it; None where `err` is not about an extra."""
    extra = missing_extra(err)
    if extra is None:
        return None
    return f"{what} needs the {extra!r} extra ({err.name} is not installed): {install_command(extra)}"
