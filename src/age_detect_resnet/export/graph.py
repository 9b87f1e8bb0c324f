"""The exported graph and its two writers: ONNX (recommended) and TorchScript.

The graph takes what every runtime backend is fed, uint8 images (B, 3, S, S) RGB, and returns the
head's readout (`AgeHead.predict`, named by `output_names`): a consumer needs no head logic.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from age_detect_resnet.inference.backends import INPUT_NAME, torchscript_warnings_said
from age_detect_resnet.modeling.checkpoint import image_size_of
from age_detect_resnet.modeling.model import AgeModel

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
# The ONNX exporter's own packages, which log every graph pass (hundreds of lines) at INFO.
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir")
# Example batch of 2, not 1: with 1 the exporters may specialise the batch axis to a constant.
_EXAMPLE_BATCH = 2


class ExportError(RuntimeError):
    """An export that could not be made or did not pass its check; the message says why."""


class ExportedAgeModel(nn.Module):
    """The exported graph: uint8 (B, 3, S, S) -> the head's readout, in `head.output_names` order."""

    def __init__(self, model: AgeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        readout = self.model.head.predict(self.model(images))  # {name: (B,)}
        return tuple(readout[name] for name in self.model.head.output_names)


def _searchsorted_onnx(sorted_sequence, values, out_int32=False, right=False, side=None, sorter=None):
    """ONNX for `torch.searchsorted` on the last axis (the distribution head's quantiles), which no
    PyTorch exporter translates: a value's index is the count of sequence entries below it."""
    import onnx
    from onnxscript import opset18 as op

    sequence = op.Unsqueeze(sorted_sequence, [-2])  # (B, 1, K)
    points = op.Unsqueeze(values, [-1])  # (B, Q, 1)
    below = op.LessOrEqual(sequence, points) if right or side == "right" else op.Less(sequence, points)
    index_type = onnx.TensorProto.INT32 if out_int32 else onnx.TensorProto.INT64
    return op.ReduceSum(op.Cast(below, to=index_type), [-1], keepdims=0)  # (B, Q)


def _example(model: AgeModel) -> torch.Tensor:
    size = image_size_of(model)
    return torch.zeros(_EXAMPLE_BATCH, 3, size, size, dtype=torch.uint8)


@contextlib.contextmanager
def exporter_warnings_only() -> Iterator[None]:
    """Within it, the ONNX tooling's loggers show warnings only (each logs every graph pass at INFO)."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(model: AgeModel, path: Path) -> None:
    """Write `ExportedAgeModel(model)` as one self-contained ONNX file with a dynamic batch axis."""
    import onnx

    try:
        with exporter_warnings_only():
            torch.onnx.export(
                ExportedAgeModel(model).eval(),
                (_example(model),),
                str(path),
                dynamo=True,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=list(model.head.output_names),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                custom_translation_table={torch.ops.aten.searchsorted.Tensor: _searchsorted_onnx},
                verbose=False,
            )
            onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # the exporter and the checker raise many types, with long reports
        raise ExportError(f"ONNX export failed: {str(err)[:800]}") from err


def export_torchscript(model: AgeModel, path: Path) -> None:
    """Write `ExportedAgeModel(model)` as traced TorchScript (the batch axis stays dynamic)."""
    log.info("TorchScript is deprecated by PyTorch; ONNX is the export format this project recommends")
    # check_trace=False: `export_model` checks the saved file itself, on other images and batch sizes.
    with torchscript_warnings_said():
        traced = torch.jit.trace(ExportedAgeModel(model).eval(), _example(model), check_trace=False)
        torch.jit.save(traced, str(path))
