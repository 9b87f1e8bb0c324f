"""Batch-norm statistics recomputed for a model's weights: the plain mean over the batches given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from age_detect_resnet.modeling.heads import create_head
from age_detect_resnet.modeling.model import AgeModel
from age_detect_resnet.modeling.norm_statistics import recompute_norm_statistics


def _model() -> AgeModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return AgeModel(backbone, create_head("regression", 4), backbone_name="tiny").eval()


def _batches(count: int, size: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, 256, (size, 3, 12, 12), dtype=torch.uint8, generator=generator) for _ in range(count)
    ]


def test_the_statistics_are_the_mean_over_the_batches_and_nothing_else_changes():
    model = _model()
    norm = model.backbone[1]
    norm.momentum = 0.3
    with torch.no_grad():
        norm.running_mean.fill_(5.0)  # stale statistics, as after averaging
        norm.running_var.fill_(9.0)
    weights = {
        k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    batches = _batches(5)
    assert recompute_norm_statistics(model, batches, limit=3) == 18  # 3 of the 5 batches
    with torch.no_grad():
        conv = model.backbone[0]
        outputs = [conv((b.float() / 255 - model.mean) / model.std) for b in batches[:3]]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs])
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1) for o in outputs])  # unbiased, per batch
    torch.testing.assert_close(norm.running_mean, means.mean(0))
    torch.testing.assert_close(norm.running_var, variances.mean(0))
    assert norm.momentum == 0.3 and not model.training  # restored
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())  # no weight moved


def test_a_model_without_batch_norms_is_left_alone_and_no_images_is_an_error():
    plain = AgeModel(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), create_head("regression", 400), backbone_name="p"
    )
    assert recompute_norm_statistics(plain, _batches(1), limit=5) == 0
    with pytest.raises(ValueError, match="no training images"):
        recompute_norm_statistics(_model(), [], limit=5)
