"""Age estimation from face photos. `from age_detect_resnet import analyze` gives the one-call API
(loaded lazily, so that data tools such as build_meta do not import the model stack)."""

from typing import Any

__all__ = ["analyze"]


def __getattr__(name: str) -> Any:
    if name == "analyze":
        from age_detect_resnet.inference.api import analyze

        return analyze
    raise AttributeError(f"module 'age_detect_resnet' has no attribute {name!r}")
