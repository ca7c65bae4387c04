"""The parts of the GPU path that a CPU can check: device choice per task, the nvJPEG settings
of the GPU pipeline definitions, and one validation pipeline per run."""
from __future__ import annotations

import pytest
import torch

from simmatch import distributed as dist

CPU = torch.device("cpu")


@pytest.mark.parametrize("local_rank,count,expected", [
    (0, 8, 0), (5, 8, 5), (7, 8, 7),  # every task sees the node's 8 GPUs
    (5, 1, 0), (7, 1, 0),  # the site binds one GPU per task: it is device 0 for each
    (5, 4, 1), (6, 2, 0),  # 2 or 4 visible devices shared by the node's tasks
])
def test_local_device_index(monkeypatch, local_rank, count, expected):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert dist.local_device_index(count) == expected


def test_local_device_index_without_devices(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dist.local_device_index(0)


def test_gpu_definitions_take_the_decoder_settings():
    """The GPU variants are defined (not built: that needs CUDA), so DALI checks every argument
    name against its operator schemas; the nvJPEG values come from the data config."""
    pytest.importorskip("nvidia.dali")
    from dali_pipelines.common import MIB, dali_pinned_estimate, decoder_args
    from dali_pipelines.labeled import labeled_pipeline
    from dali_pipelines.unlabeled import unlabeled_pipeline
    from dali_pipelines.val import val_pipeline
    from simmatch.config import load_config

    cfg = load_config(None, ["data.decoder_width_hint=4000", "data.host_padding_mb=8",
                             "data.num_threads=3"]).data
    args = decoder_args(cfg, "gpu")
    assert args["device"] == "mixed" and args["preallocate_width_hint"] == 4000
    assert args["preallocate_height_hint"] == 6430 and args["host_memory_padding"] == 8 * MIB
    assert args["device_memory_padding"] == 64 * MIB
    assert "host_memory_padding" not in decoder_args(cfg, "cpu")
    common = dict(batch_size=2, num_threads=1, device_id=None, seed=1, cfg=cfg, file_root="/x",
                  files=["a.jpg", "b.jpg"], device="gpu", layout="CHW")
    for definition, extra in ((labeled_pipeline, {"indices": [0, 1]}),
                              (unlabeled_pipeline, {"indices": [0, 1]}),
                              (val_pipeline, {"labels": [0, 1], "resize_shorter": 37})):
        assert definition(**common, **extra) is not None
    # 3 decoders (labeled, unlabeled, validation) x 3 threads x 2 pinned buffers x 8 MiB
    assert dali_pinned_estimate(cfg, 3) == 3 * 3 * 2 * 8 * MIB


def test_validation_pipeline_is_built_once(digits_root, monkeypatch):
    """Two evaluations build one pipeline and see the same batches as a fresh pipeline; an
    abandoned pass makes the next one rebuild (the reader would be mid-list)."""
    pytest.importorskip("nvidia.dali")
    import dali_pipelines.common as common
    from conftest_data import data_cfg, streams_for
    from simmatch.engine.evaluate import evaluate

    builds = []
    real_build = common.build

    def counting_build(definition, **kwargs):
        builds.append(definition.__name__)
        return real_build(definition, **kwargs)

    monkeypatch.setattr(common, "build", counting_build)
    streams = streams_for(data_cfg(digits_root, "data.val_batch=32"), 0, 1, CPU)  # 395 = 12*32 + 11
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    first = evaluate(model, streams.val())
    second = evaluate(model, streams.val())
    assert builds == ["val_pipeline"] and first == second and first["count"] == 395

    passes = [list(streams.val()) for _ in range(2)]
    fresh = list(streams_for(data_cfg(digits_root, "data.val_batch=32"), 0, 1, CPU).val())
    assert builds == ["val_pipeline"] * 2
    for got in passes:
        assert [b["x"].shape[0] for b in got] == [32] * 12 + [11]
        assert all(torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
                   for a, b in zip(got, fresh))

    half = streams.val()
    next(half), next(half)  # a pass left unfinished
    again = list(streams.val())
    assert builds == ["val_pipeline"] * 3
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(again, fresh))
    streams.close()
