"""The GPU path on a CUDA machine: `python -m pytest -m gpu tests` (skipped without CUDA).

Written for one H100: ResNet-50 where precision or memory layout matters, small batches.
Each test compares against an independent result (the CPU pipeline, the fp32 step, the
contiguous-layout logits, the eager step) or a stated target (checkpoint stall <= 2 s).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import run_tool

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: run `python -m pytest -m gpu tests` on a GPU node")]


@contextlib.contextmanager
def exact_fp32():
    """No TF32 in convolutions or matmuls: fp32 references that are really fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    return torch.device("cuda", 0)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    from simmatch.selftest.samples import write_samples

    return write_samples(tmp_path_factory.mktemp("samples"))


def trainer_for(cuda: torch.device, run_dir: Path, *overrides: str):
    from simmatch.selftest.step import GPU_SETUP, build_trainer

    return build_trainer(GPU_SETUP, 1, cuda, run_dir, ["data.backend=synthetic", *overrides], threads=4)


def test_gpu_and_cpu_pipelines_agree(cuda, samples):
    """nvJPEG vs PIL, and the DALI GPU val/train streams vs the DALI CPU ones, on the same JPEGs."""
    pytest.importorskip("nvidia.dali")
    from simmatch.config import load_config
    from simmatch.selftest.pipelines import StreamSetup, check_decode, check_train, check_val
    from simmatch.selftest.samples import image_files

    cfg = load_config(None, []).data
    decode = check_decode("nvjpeg decode", samples / "train", image_files(samples, "train"), "gpu", cfg, 0)
    assert decode.status == "PASS", decode.line()
    setup = StreamSetup("DALI GPU", ["data.backend=dali", "data.device=gpu"],
                        "DALI CPU", ["data.backend=dali", "data.device=cpu"])
    val = check_val(setup, [], samples, 0, 1, cuda, 224, 4)
    assert val.status == "PASS", val.line()
    train = check_train(setup, [], samples, 0, 1, cuda, 224, 4, 4)
    assert train.status == "PASS", train.line()


def test_trainer_enables_cudnn_benchmark(cuda, tmp_path):
    torch.backends.cudnn.benchmark = False
    trainer_for(cuda, tmp_path, "model.arch=resnet18")
    assert torch.backends.cudnn.benchmark


@pytest.mark.parametrize("amp,rel", [("bf16", 0.02), ("fp16", 0.005)])
def test_amp_step_finite_and_close_to_fp32(cuda, tmp_path, amp, rel):
    """One supervised ResNet-50 step on the same synthetic batch from the same weights:
    the autocast loss is finite and within `rel` of the fp32 loss; weights stay finite."""
    losses = {}
    with exact_fp32():
        for mode in ("none", amp):
            trainer = trainer_for(cuda, tmp_path / mode, f"train.amp={mode}", "method.name=supervised")
            out = trainer.step()
            losses[mode] = float(out["loss"])
            assert all(bool(torch.isfinite(p).all()) for p in trainer.method.student.parameters())
            del trainer
    assert torch.isfinite(torch.tensor(losses[amp]))
    assert losses[amp] == pytest.approx(losses["none"], rel=rel)


def test_simmatch_bf16_steps_finite(cuda, tmp_path):
    trainer = trainer_for(cuda, tmp_path, "train.amp=bf16")
    for _ in range(3):
        out = trainer.step()
        bad = [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
        assert not bad, f"not finite: {bad}"


def test_channels_last_gives_the_same_logits(cuda):
    from simmatch.models import build_network

    torch.manual_seed(0)
    net = build_network("resnet50", 1000).to(cuda).eval()
    x = torch.randn(8, 3, 224, 224, device=cuda)
    with exact_fp32(), torch.no_grad():
        ref = net(x)[0]
        last = copy.deepcopy(net).to(memory_format=torch.channels_last)
        got = last(x.contiguous(memory_format=torch.channels_last))[0]
    assert got.shape == ref.shape == (8, 1000)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert bool((got.argmax(1) == ref.argmax(1)).all())


def test_compiled_step_runs_and_matches_eager(cuda, tmp_path):
    """train.compile=true: the compiled student's step gives the eager step's loss (ResNet-18
    to keep compilation short; the step code is the same for ResNet-50)."""
    losses = {}
    with exact_fp32():
        for compiled in (False, True):
            trainer = trainer_for(cuda, tmp_path / str(compiled), "model.arch=resnet18", "train.amp=none",
                                  "method.name=supervised", f"train.compile={compiled}")
            losses[compiled] = [float(trainer.step()["loss"]) for _ in range(2)]
            del trainer
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_checkpoint_stall_with_a_cuda_model(tmp_path):
    """ResNet-50 student + teacher + momentum + the 10% bank on the GPU: the training stall
    (device-to-host copy; the write happens in a thread) within the 2 s target."""
    res = run_tool("benchmarks/checkpoint.py", "--device", "cuda", "--repeats", "2", "--dir", str(tmp_path),
                   timeout=500)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["device"] == "cuda" and 400 < out["size_mb"] < 460
    assert out["stall_s"] <= 2.0, out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_selftest_passes_on_this_gpu():
    res = run_tool("tools/selftest.py", timeout=850)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "PASS  nvjpeg decode" in res.stdout and "0 failed" in res.stdout.splitlines()[-1]
