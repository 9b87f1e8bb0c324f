"""Where models run: `--precision auto` takes bf16 on a CPU only where it has bf16 instructions."""

from __future__ import annotations

import pytest
import torch

from age_detect_resnet import runtime

AVX512_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "onednn", "expected"),
    [
        (AVX512_ONLY, True, "fp32"),  # oneDNN emulates bf16 there: a third of fp32's speed
        (AVX512_BF16, True, "bf16"),
        (ARM_BF16, True, "bf16"),
        (AVX512_BF16, False, "fp32"),  # oneDNN has no bf16 kernels for it
        (None, True, "bf16"),  # no flags to read (not Linux): oneDNN's word
    ],
)
def test_auto_precision_on_a_cpu_is_bf16_only_with_native_bf16(
    tmp_path, monkeypatch, cpuinfo, onednn, expected
):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    read_flags = runtime.cpu_flags
    monkeypatch.setattr(runtime, "cpu_flags", lambda: read_flags(path))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == expected
    assert runtime.resolve_precision("fp32", torch.device("cpu")) == "fp32"  # asked for: kept


def test_version_names_the_package_the_bundled_model_and_the_libraries(capsys):
    import cv2
    import torch

    import age_detect_resnet
    from age_detect_resnet.cli import main
    from age_detect_resnet.modeling.bundled import AGE_MODEL_SHA256

    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"age-detect {age_detect_resnet.__version__} ")
        assert AGE_MODEL_SHA256[:12] in line and torch.__version__ in line and cv2.__version__ in line
    assert age_detect_resnet.__version__ != "0+unknown"  # the tests run on the installed package


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_the_seeds_loader_asked_for_a_gpu_where_there_is_none_says_so(tiny_run):
    from age_detect_resnet.inference import load_trained_model

    with pytest.raises(runtime.DeviceError, match="no CUDA GPU"):  # was torch's own RuntimeError
        load_trained_model(tiny_run, "cuda")
    assert load_trained_model(tiny_run, "auto").metadata  # auto: here, the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "unknown device 'gpu'; use cpu, cuda, cuda:N or auto"),  # was torch's own RuntimeError
        ("mps", "'mps' is not supported"),
        (torch.device("cuda", 1), "'cuda:1' was requested but no CUDA GPU is visible"),
        (2.5, "unknown device 2.5"),
    ],
)
def test_a_device_that_cannot_be_used_is_named(device, message):
    with pytest.raises(runtime.DeviceError, match=message):
        runtime.select_device(device)


def test_a_device_may_be_a_name_a_torch_device_or_none():
    cpu = torch.device("cpu")
    assert runtime.select_device("cpu") == runtime.select_device(cpu) == cpu
    assert runtime.select_device(None) == runtime.select_device("auto")
