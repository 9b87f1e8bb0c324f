"""Age estimation from face photos. `from age_detect_resnet import analyze` gives the one-call API
(loaded lazily, so that data tools such as build_meta do not import the model stack)."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["__version__", "analyze"]

try:
    __version__ = version("age-detect-resnet")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "analyze":
        from age_detect_resnet.inference.api import analyze

        return analyze
    raise AttributeError(f"module 'age_detect_resnet' has no attribute {name!r}")
