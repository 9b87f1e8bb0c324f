"""The training loop's owners, tested directly: heads' readout, the training state, EMA, gradient
accumulation and clipping, the run folder and the runtime backends."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from age_detect_resnet.data.dataset import Batch
from age_detect_resnet.inference.backends import TorchRunner, load_runner
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.heads import create_head
from age_detect_resnet.modeling.model import create_model
from age_detect_resnet.run_folder import RunFolder, RunFolderError
from age_detect_resnet.training.config import ConfigError, resolve_config
from age_detect_resnet.training.ema import ModelEma
from age_detect_resnet.training.engine import train_one_epoch
from age_detect_resnet.training.optim import create_optimizer, create_scheduler
from age_detect_resnet.training.state import TrainingState


def small_model(head: str = "distribution"):
    torch.manual_seed(0)
    return create_model("resnet18", head, pretrained=False, init_age=30.0)


def batches(count: int, size: int = 4, seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Batch(
            images=torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator),
            ages=torch.rand(size, generator=generator) * 80,
            kept=torch.ones(size, dtype=torch.bool),
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("kind", "names"),
    [("regression", ("age",)), ("bins", ("age",)), ("distribution", ("age", "lower", "upper"))],
)
def test_each_head_reads_out_the_outputs_it_names(kind, names):
    head = create_head(kind, 16)
    outputs = head(torch.randn(5, 16))
    readout = head.predict(outputs)
    assert tuple(readout) == head.output_names == names
    assert all(value.shape == (5,) for value in readout.values())
    assert torch.allclose(readout["age"], head.decode(outputs))


def test_the_interval_level_is_a_buffer_and_old_files_without_it_still_load():
    model = small_model()
    model.head.interval_quantile_level = 0.9
    state = model.state_dict()
    assert float(state["head.quantile_level"]) == pytest.approx(0.9)
    other = small_model()
    other.load_state_dict(state)
    assert other.head.interval_quantile_level == pytest.approx(0.9)
    del state["head.quantile_level"]  # a model saved before the level was a buffer
    third = small_model()
    third.load_state_dict(state, strict=True)
    assert third.head.interval_quantile_level == pytest.approx(0.8)  # its built (metadata) value


def test_the_training_state_restores_every_part(tmp_path):
    config = resolve_config(None, {"ema_decay": 0.9})
    model = small_model()
    optimizer = create_optimizer(config, model)
    state = TrainingState(model, optimizer, create_scheduler(config, optimizer, 3), ema=ModelEma(model, 0.9))
    train_one_epoch(
        model,
        batches(3),
        optimizer,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        epoch=1,
        scheduler=state.scheduler,
        channels_last=False,
        progress=False,
        ema=state.ema,
    )
    model.head.interval_quantile_level = 0.77
    assert state.record({"epoch": 1, "val_mae": 5.0}) and not state.record({"epoch": 2, "val_mae": 6.0})
    state.save(tmp_path / "last.pt")

    fresh = small_model()
    fresh_optimizer = create_optimizer(config, fresh)
    restored = TrainingState(
        fresh, fresh_optimizer, create_scheduler(config, fresh_optimizer, 3), ema=ModelEma(fresh, 0.9)
    )
    restored.restore(tmp_path / "last.pt")
    assert (restored.epoch, restored.best_mae, len(restored.history)) == (2, 5.0, 2)
    assert fresh.head.interval_quantile_level == pytest.approx(0.77)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        state.ema.module.state_dict().values(), restored.ema.module.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert restored.ema.updates == 3
    assert restored.scheduler.last_epoch == state.scheduler.last_epoch
    assert restored.evaluated_model is restored.ema.module


def test_ema_weights_lag_behind_the_trained_ones():
    model = small_model("regression")
    ema = ModelEma(model, decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # decay at the first update: min(0.5, 2/11)
    weight = "head.layers.0.weight"
    expected = before[weight] + (1 - 2 / 11) * 1.0
    assert torch.allclose(ema.module.state_dict()[weight], expected)


def test_ema_follows_batchnorm_statistics_but_keeps_its_own_calibrated_interval():
    model = small_model()
    ema = ModelEma(model, decay=0.5)
    ema.module.head.interval_quantile_level = 0.9  # calibrated on the averaged model's validation outputs
    model.train()(torch.randn(4, 3, 32, 32))  # a training step moves BatchNorm's running statistics
    ema.update(model)
    averaged, trained = ema.module.state_dict(), model.state_dict()
    assert torch.equal(averaged["backbone.bn1.running_mean"], trained["backbone.bn1.running_mean"])
    assert ema.module.head.interval_quantile_level == pytest.approx(0.9)
    assert model.head.interval_quantile_level == pytest.approx(0.8)


def _trained_head_weight(loader, *, accumulate: int = 1, clip: float = 0.0) -> torch.Tensor:
    """The last layer's weight after one SGD epoch over `loader`, BatchNorm kept in eval mode so that its
    statistics do not depend on the batch size."""
    model = small_model("regression").eval()
    model.train = lambda mode=True: model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    train_one_epoch(
        model,
        loader,
        optimizer,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        epoch=1,
        channels_last=False,
        progress=False,
        accumulate=accumulate,
        clip_grad_norm=clip,
    )
    return model.head.layers[-1].weight.detach().clone()


def test_accumulating_two_half_batches_equals_one_full_batch():
    full = batches(1, 8)[0]
    halves = [Batch(full.images[i : i + 4], full.ages[i : i + 4], full.kept[i : i + 4]) for i in (0, 4)]
    assert torch.allclose(_trained_head_weight([full]), _trained_head_weight(halves, accumulate=2), atol=1e-6)


def test_gradient_clipping_bounds_the_step():
    start = small_model("regression").head.layers[-1].weight.detach().clone()
    clipped = _trained_head_weight(batches(1), clip=1e-3)
    free = _trained_head_weight(batches(1))
    assert (clipped - start).norm() <= 1e-4 * 1e-3 + 1e-9 < (free - start).norm()


def test_loop_options_are_validated():
    with pytest.raises(ConfigError, match="accumulate"):
        resolve_config(None, {"accumulate": 0})
    with pytest.raises(ConfigError, match="ema_decay"):
        resolve_config(None, {"ema_decay": 1.0})


def test_the_run_folder_alone_names_a_runs_files(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert RunFolder.of(run.path) is None and RunFolder.of("default") is None  # not a run (no config.json)
    run.path.mkdir()
    run.config.write_text('{"data": {"dataset": "utkface", "data_root": "x"}}')
    found = RunFolder.of(run.best)  # a file in the run
    assert found is not None and found.path == run.path
    assert found.data_settings["dataset"] == "utkface"
    assert found.export("onnx").name == "age_model.onnx" and found.last.name == "last.pt"
    with pytest.raises(RunFolderError, match=r"split\.csv"):
        found.load_split()


def test_the_torch_backend_matches_the_model_and_unknown_backends_are_refused(tmp_path):
    model = small_model().eval()
    model.metadata = {"image_size": 32}
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    runner, metadata = load_runner(model, backend="torch")
    out = runner(images)
    assert isinstance(runner, TorchRunner) and metadata["image_size"] == 32
    with torch.inference_mode():
        expected = model.predict(images)
    assert set(out) == {"age", "lower", "upper"}
    assert np.allclose(out["age"], expected["age"].numpy(), atol=0.05)  # bf16 autocast where available
    with pytest.raises(checkpoint.ModelFileError, match="backend"):
        load_runner(model, backend="tensorrt")
    with pytest.raises(checkpoint.ModelFileError, match="export"):
        load_runner(model, backend="onnx")  # a model in memory: the onnx backend runs exported files
    assert math.isfinite(float(out["upper"][0]))
