"""tools/selftest.py on the CPU (1 process and 3 gloo ranks), a check failing on purpose, and
the verdict logic of the GPU-only checks with the values a GPU node would give."""
from __future__ import annotations

import pytest
import torch

from conftest import call_tool, run_tool
from simmatch.selftest.driver import check_driver
from simmatch.selftest.pipelines import compare_views, image_differences
from simmatch.selftest.report import FAIL, PASS, SKIP, Check, exit_code, merge

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def lines_by_name(stdout: str) -> dict[str, str]:
    """'PASS  collectives  ...' -> {'collectives': 'PASS  collectives  ...'}."""
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition("  ")
        if status in (PASS, FAIL, SKIP):
            out[rest.strip().split("  ")[0].strip()] = line
    return out


def test_driver_verdicts():
    cuda130 = ("nvidia-dali-cuda130", "2.4.0", 13)
    old = check_driver(12040, cuda130, "550.54.15")
    assert old.status == FAIL and "CUDA 12.4" in old.reason and "r580" in old.reason
    assert "dali-cuda120" in old.fix
    assert check_driver(13000, cuda130, "580.65.06").status == PASS
    assert check_driver(12020, ("nvidia-dali-cuda120", "2.4.0", 12), None).status == PASS
    assert check_driver(None, cuda130).status == SKIP
    assert check_driver(13000, None).status == SKIP


def test_merge_names_the_failing_rank():
    ok, bad, skip = Check("a", PASS, "fine"), Check("a", FAIL, "broken", "fix it"), Check("b", SKIP, "no")
    merged = merge([[ok, skip], [bad, skip], [bad, skip]])
    assert merged[0].status == FAIL and merged[0].reason == "rank 1: broken (and 1 more rank(s))"
    assert merged[1].status == SKIP and exit_code(merged) == 1
    assert exit_code(merge([[ok, skip]])) == 0


def test_stream_comparison_catches_a_mismatching_pipeline():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(24, 3, 16, 16, generator=gen)
    views = {"weak": (base - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)}
    assert compare_views(views, {"weak": views["weak"].flip(0)}, MEAN, STD) == []
    bgr = {"weak": views["weak"][:, [2, 1, 0]]}  # channel order swapped: means move by > 0.25
    assert any("channel 0: mean" in p for p in compare_views(views, bgr, MEAN, STD))
    unnormalised = {"weak": base * 255}
    assert any("outside the normalised range" in p for p in compare_views(views, unnormalised, MEAN, STD))
    smaller = {"weak": views["weak"][:, :, :8]}
    assert compare_views(views, smaller, MEAN, STD) == ["weak: shape (24, 3, 16, 16) vs (24, 3, 8, 16)"]


def test_val_difference_in_pixel_levels_and_crop_offset():
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    y = x + 2.0 / (255 * torch.tensor(STD).view(1, 3, 1, 1))  # exactly 2 levels everywhere
    mean, p99 = image_differences(x, y, STD, shift=False)
    assert mean == pytest.approx(2.0, abs=1e-3) and p99 == pytest.approx(2.0, abs=1e-3)
    moved = torch.roll(x, shifts=1, dims=3)  # the crop one pixel to the side
    assert image_differences(x, moved, STD, shift=False)[0] > 10  # uniform noise: ~19 levels
    assert image_differences(x, moved, STD, shift=True)[0] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_selftest_one_process_cpu():
    res = run_tool("tools/selftest.py", timeout=850)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    lines = lines_by_name(res.stdout)
    for name in ("cpu decode", "val stream", "train streams", "collectives", "bank all-gather",
                 "train step", "throughput"):
        assert lines[name].startswith(PASS), lines[name]
    assert lines["nvjpeg decode"].startswith(SKIP) and "no CUDA" in lines["nvjpeg decode"]
    assert lines["pinned memory"].startswith(SKIP) and "384 MiB" in lines["pinned memory"]
    assert "gloo, 1 rank(s)" in lines["collectives"] and "fp32" in lines["train step"]
    assert "DALI CPU vs torch" in lines["val stream"]
    assert "0 failed" in res.stdout.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_selftest_three_gloo_ranks():
    res = run_tool("tools/selftest.py", "--nproc", "3", "--skip", "throughput,train-streams", timeout=850)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    lines = lines_by_name(res.stdout)
    assert lines["collectives"].startswith(PASS) and "gloo, 3 rank(s)" in lines["collectives"]
    assert lines["bank all-gather"].startswith(PASS) and "3 rank(s)" in lines["bank all-gather"]
    assert lines["train step"].startswith(PASS) and "3 rank(s)" in lines["train step"]
    assert lines["throughput"] == f"{SKIP}  throughput       left out by --skip"
    assert res.stdout.count("selftest: ") == 2  # the header and one summary: rank 0 speaks alone


@pytest.mark.slow
def test_selftest_fails_on_a_corrupt_jpeg(tmp_path):
    pytest.importorskip("nvidia.dali")
    from simmatch.selftest.samples import write_samples

    root = write_samples(tmp_path / "data")
    good = (root / "train" / "china" / "china_00.jpg").read_bytes()
    (root / "train" / "china" / "bad.jpg").write_bytes(good[: len(good) // 3])
    res = run_tool("tools/selftest.py", "--data", str(root), "--skip",
                   "val-stream,train-streams,train-step,throughput", timeout=500)
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    line = lines_by_name(res.stdout)["cpu decode"]
    assert line.startswith(FAIL) and "bad.jpg" in line and "check_data.py" in line
    assert lines_by_name(res.stdout)["collectives"].startswith(PASS)  # the rest still ran


def test_selftest_unknown_check_is_one_error_line():
    res = call_tool("tools/selftest.py", "--skip", "speed")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --skip speed")
