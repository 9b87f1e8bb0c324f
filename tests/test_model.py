"""Model factories: the seed's architecture, weights from a file or the download, every backbone and head."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from age_detect_resnet.modeling.heads import BinsHead, DistributionHead, RegressionHead, create_head
from age_detect_resnet.modeling.model import (
    AgeModel,
    WeightsError,
    create_backbone,
    create_model,
    create_resnet50_regressor,
    folded_for_inference,
    load_state_dict_file,
)
from conftest import TEST_IMAGES, WEIGHTS, require


def test_the_seed_architecture():
    model = create_resnet50_regressor(pretrained=False)
    layers = list(model.head.layers)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (2048, 256, 1)
    assert isinstance(model.backbone, torchvision.models.ResNet)
    ages = model.eval().predict_ages(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert ages.shape == (2,)


def test_imagenet_weights_from_a_local_file_are_loaded():
    weights = require(WEIGHTS / "resnet50_imagenet_v1_fp16.safetensors")
    model = create_resnet50_regressor(weights=weights)
    reference = torchvision.models.resnet50()
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(weights))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_offline_without_a_weights_file_says_how_to_fix_it(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError, match=r"--weights FILE.*--no-pretrained"):
        create_resnet50_regressor(pretrained=True)


def test_a_weights_file_for_another_architecture_is_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="does not match"):
        create_backbone("resnet50", weights=tmp_path / "r18.pth")


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]
)
def test_every_backbone_gives_features_of_its_declared_width(name):
    backbone, width = create_backbone(name, pretrained=False)
    with torch.no_grad():
        assert backbone.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, width)


def test_regression_starts_at_the_mean_training_age():
    model = create_model("resnet18", "regression", pretrained=False, init_age=33.0).eval()
    assert isinstance(model.head, RegressionHead)
    assert abs(model.predict_ages(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).item() - 33.0) < 5


def test_heads_decode_ages_in_years():
    bins = BinsHead(8, 4, min_age=10, max_age=75)
    assert bins.labels()[:2] == ["10-14", "15-19"] and bins.labels()[-1] == "75-75"
    certain = torch.full((1, len(bins.labels())), -50.0)
    certain[0, 2] = 50.0  # all mass on 20-24
    assert bins.decode(certain).item() == pytest.approx(22.0)
    assert bins.bin_of(torch.tensor([10.0, 24.4, 75.0])).tolist() == [0, 2, 13]

    dist = DistributionHead(8, 4, label_sigma=2.0)
    target = dist.target_distribution(torch.tensor([40.0]))
    assert target.sum().item() == pytest.approx(1.0) and target.argmax().item() == 40
    logits = torch.log(target + 1e-9)
    assert dist.decode(logits).item() == pytest.approx(40.0, abs=0.01)
    low, high = dist.interval_bounds(logits, 0.8)[0].tolist()
    assert low < 40 < high and high - low == pytest.approx(2 * 1.2816 * 2.0, rel=0.1)  # 80% of N(40, 2)


def test_the_interval_stays_within_the_ages_the_classes_stand_for():
    """Class 0 stands for [-0.5, 0.5]: a baby's interval reached -0.2 years."""
    dist = DistributionHead(8, 4, label_sigma=2.0)
    for age in (0.0, 100.0):
        logits = torch.log(dist.target_distribution(torch.tensor([age])) + 1e-9)
        low, high = dist.interval_bounds(logits, 0.99)[0].tolist()
        assert 0.0 <= low <= age <= high <= 100.0


def test_the_expectation_term_adds_the_l1_error_of_the_expected_age():
    ages = torch.tensor([30.0, 50.0])
    logits = torch.randn(2, 101)
    plain = DistributionHead(8, 4, label_sigma=2.0)
    dldl = DistributionHead(8, 4, label_sigma=2.0, expectation_weight=0.5)
    l1 = (plain.decode(logits) - ages).abs().mean()
    assert dldl.loss(logits, ages).item() == pytest.approx(plain.loss(logits, ages).item() + 0.5 * l1.item())
    options = dldl.describe()
    rebuilt = create_head(options.pop("kind"), 8, **options)
    assert rebuilt.expectation_weight == 0.5


def test_a_proportional_label_keeps_a_babys_label_on_its_age_and_widens_with_age():
    ages = torch.tensor([1.0, 30.0, 70.0])
    fixed = DistributionHead(8, 4, label_sigma=2.0)
    spread = DistributionHead(8, 4, label_sigma=2.0, label_spread="proportional")
    mean = lambda head: (head.target_distribution(ages) * head.centres).sum(-1)  # noqa: E731
    # Cut off at age 0, a fixed 2-year Gaussian around age 1 has its mean at 1.8; the proportional one
    # (0.13 y wide at 1) stays on 1, is the fixed one at 30 and is 2.3 times as wide at 70.
    assert mean(fixed)[0].item() == pytest.approx(1.77, abs=0.02)
    assert mean(spread)[0].item() == pytest.approx(1.0, abs=0.01)
    assert spread.label_sigmas(ages).tolist() == pytest.approx([4 / 31, 2.0, 142 / 31])
    assert torch.allclose(spread.target_distribution(ages[1:2]), fixed.target_distribution(ages[1:2]))
    options = spread.describe()
    assert create_head(options.pop("kind"), 8, **options).label_spread == "proportional"
    capped = DistributionHead(8, 4, label_sigma=2.0, label_spread="capped")
    assert capped.label_sigmas(ages).tolist() == pytest.approx([4 / 31, 2.0, 2.0])
    with pytest.raises(ValueError, match="label_spread"):
        DistributionHead(8, 4, label_spread="log")


def test_the_config_offers_the_heads_label_spreads():
    from age_detect_resnet.modeling.heads import LABEL_SPREADS as HEAD_SPREADS
    from age_detect_resnet.training.config import LABEL_SPREADS

    assert LABEL_SPREADS == HEAD_SPREADS


def test_interval_calibration_reaches_the_nominal_coverage():
    torch.manual_seed(0)
    head = DistributionHead(8, 4, label_sigma=1.0, interval=0.8)
    ages = torch.rand(2000) * 60 + 10
    # an over-confident model: sharp predictions (sigma 1) for errors of sigma 4
    centre = ages + torch.randn(2000) * 4
    logits = torch.log(head.target_distribution(centre) + 1e-12)
    head.calibrate_interval(logits, ages)
    bounds = head.interval_bounds(logits)
    coverage = ((ages >= bounds[:, 0]) & (ages <= bounds[:, 1])).float().mean().item()
    assert abs(coverage - 0.8) < 0.02


def test_every_configurable_backbone_can_be_built():
    from age_detect_resnet.modeling.model import _BACKBONES
    from age_detect_resnet.training.config import BACKBONES

    assert set(BACKBONES) == set(_BACKBONES)


def test_resnet50_v1_layout_fits_the_v1_weights():
    """The offline weights are ResNet v1: in the v1 layout they recognise a suit with more confidence."""
    from PIL import Image
    from torchvision.models import ResNet50_Weights

    weights = require(WEIGHTS / "resnet50_imagenet_v1_fp16.safetensors")
    photo = Image.open(require(TEST_IMAGES) / "biden.jpg").convert("RGB")
    batch = ResNet50_Weights.IMAGENET1K_V1.transforms()(photo).unsqueeze(0)
    suit = ResNet50_Weights.IMAGENET1K_V1.meta["categories"].index("suit")
    confidence = {}
    for name in ("resnet50", "resnet50_v1"):
        backbone, _ = create_backbone(name, weights=weights)
        classifier = torchvision.models.resnet50()
        classifier.load_state_dict(load_state_dict_file(weights))
        backbone.fc = classifier.fc
        with torch.no_grad():
            confidence[name] = backbone.eval()(batch).softmax(-1)[0, suit].item()
    assert backbone.layer2[0].conv1.stride == (2, 2) and backbone.layer2[0].conv2.stride == (1, 1)
    assert confidence["resnet50_v1"] > 0.5 > confidence["resnet50"]


def test_resnet50_v1_has_no_download():
    with pytest.raises(WeightsError, match="--weights FILE"):
        create_backbone("resnet50_v1", pretrained=True)


def _with_real_statistics(model: AgeModel) -> AgeModel:
    """`model` with batch-norm statistics and scales far from the identity, so that folding them is
    actually tested."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor, low, high in (
                    (module.running_mean, -0.5, 0.5),
                    (module.running_var, 0.5, 2.0),
                    (module.weight, 0.5, 1.5),
                    (module.bias, -0.2, 0.2),
                ):
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
    return model.eval()


@pytest.mark.parametrize("backbone", ["resnet50_v1", "mobilenet_v2"])
def test_folded_batch_norms_give_the_same_ages_and_leave_the_model_as_it_was(backbone):
    from age_detect_resnet.modeling.ensemble import AgeEnsemble

    torch.manual_seed(0)
    single = _with_real_statistics(create_model(backbone, "distribution", pretrained=False))
    ensemble = AgeEnsemble(
        [single, _with_real_statistics(create_model("resnet18", "distribution", pretrained=False))],
        [3, 1],
        mirror=True,
    )
    images = torch.randint(
        0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    for model in (single, ensemble.eval()):
        keys = list(model.state_dict())
        folded = folded_for_inference(model)
        with torch.inference_mode():
            expected, got = model.predict(images), folded.predict(images)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-3)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert (
            any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and list(model.state_dict()) == keys
        )


def test_a_backbone_that_cannot_be_traced_is_kept_as_it_is():
    class Branching(nn.Module):  # control flow on the data: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.norm(self.conv(x))
            return (x if x.sum() > 0 else -x).mean(dim=(2, 3))

    model = _with_real_statistics(
        AgeModel(Branching(), create_head("regression", 4), backbone_name="branching")
    )
    folded = folded_for_inference(model)
    assert isinstance(folded.backbone, Branching) and folded.backbone is not model.backbone
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(folded.predict_ages(images), model.predict_ages(images))


def test_the_inference_runner_folds_a_copy():
    from age_detect_resnet.inference.backends import TorchRunner

    torch.manual_seed(0)
    model = _with_real_statistics(create_model("mobilenet_v2", "distribution", pretrained=False))
    images = torch.randint(
        0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    folded, plain = TorchRunner(model, precision="fp32"), TorchRunner(model, precision="fp32", fold=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    assert plain.model is model and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    np.testing.assert_allclose(folded(images)["age"], plain(images)["age"], atol=1e-3)
