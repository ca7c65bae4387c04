"""Every benchmark runs tiny on the CPU and ends with one JSON object whose figures agree
with each other (no speed is asserted)."""
from __future__ import annotations

import json

import pytest

from conftest import call_tool

# each runs in this process as its command line would (conftest.call_tool) and starts processes of its
# own: step.py one per configuration (its peak memory its own), loader.py its readers under strace
pytestmark = pytest.mark.slow


def last_json(res) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_step_benchmark_tiny_with_comparison():
    out = last_json(call_tool("benchmarks/step.py", "--arch", "resnet10", "--crop", "16", "--classes", "10",
                             "--batch", "2", "--mu", "2", "--warmup", "1", "--iters", "2",
                             "--compare", "fixmatch", "--device", "cpu"))
    simmatch, fixmatch = out["runs"]
    assert (simmatch["method"], fixmatch["method"]) == ("simmatch", "fixmatch")
    for run in out["runs"]:
        # 2 labeled + 4 unlabeled images, each unlabeled one seen as a weak and a strong view
        assert run["img_s"] == pytest.approx((2 + 4 * 2) / (run["step_ms"] / 1e3))
        assert run["unlabeled_img_s"] == pytest.approx(4 / (run["step_ms"] / 1e3))
        assert run["breakdown_ms"]["backward"] > 0 and run["breakdown_ms"]["student_forward"] > 0
    assert simmatch["breakdown_ms"]["teacher_forward"] > 0
    # FixMatch keeps no bank, and its pseudo-labels come from the student's own forward
    assert fixmatch["breakdown_ms"]["bank_update"] == 0.0 and fixmatch["breakdown_ms"]["teacher_forward"] == 0.0
    assert out["ratio"] == pytest.approx(simmatch["step_ms"] / fixmatch["step_ms"])


def test_step_benchmark_tiny_virtual_ranks():
    out = last_json(call_tool("benchmarks/step.py", "--arch", "resnet10", "--crop", "16", "--classes", "10",
                             "--batch", "2", "--mu", "2", "--warmup", "1", "--iters", "2",
                             "--breakdown-iters", "0", "--virtual", "2", "--device", "cpu"))
    plain, virtual = out["runs"]
    assert (plain["virtual"], plain["micro_batches"]) == (0, 1)
    assert (virtual["virtual"], virtual["micro_batches"]) == (2, 2)
    # one step: 2 ranks of 2 labeled + 4 unlabeled images (a weak and a strong view each)
    assert (plain["images_per_step"], virtual["images_per_step"]) == (6, 12)
    for run in out["runs"]:
        assert run["repeats"] == 1 and run["ms_per_image_all"] == [round(run["ms_per_image"], 3)]
        assert run["ms_per_image"] == pytest.approx(run["step_ms"] / run["images_per_step"])
        assert run["img_s"] == pytest.approx(run["micro_batches"] * (2 + 4 * 2) / (run["step_ms"] / 1e3))
        # each configuration in its own process: its peak is at least what it held before its steps
        assert run["peak_mem_gib"] >= run["mem_before_steps_gib"] > 0
        assert run["step_mem_growth_gib"] == pytest.approx(run["peak_mem_gib"] - run["mem_before_steps_gib"])
        assert run["best_ms_per_image"] <= run["ms_per_image"] and run["cpu_ms_per_image"] > 0
    assert plain["overhead_pct"] == 0.0
    assert virtual["overhead_pct"] == pytest.approx(100 * (virtual["ms_per_image"] / plain["ms_per_image"] - 1))
    assert out["overhead_pct"] == {"2": virtual["overhead_pct"]}
    assert virtual["overhead_best_pct"] == pytest.approx(
        100 * (virtual["best_ms_per_image"] / plain["best_ms_per_image"] - 1))
    assert virtual["peak_mem_over_plain_gib"] == pytest.approx(virtual["peak_mem_gib"] - plain["peak_mem_gib"])


def test_targets_and_checkpoint_benchmarks_tiny(tmp_path):
    t = last_json(call_tool("benchmarks/targets.py", "--bu", "8", "--k", "50", "--classes", "5",
                           "--repeats", "2", "--device", "cpu"))
    assert t["benchmark"] == "targets" and 0 < t["best_s"] <= t["median_s"]
    c = last_json(call_tool("benchmarks/checkpoint.py", "--arch", "resnet18", "--bank", "100", "--classes", "10",
                           "--repeats", "1", "--dir", str(tmp_path), "--device", "cpu"))
    # resnet18 student + teacher + momentum: 3 x 11.2M fp32 parameters, about 134 MB
    assert 120 < c["size_mb"] < 150 and c["stall_s"] >= 0 and c["write_s"] > 0 and c["verify_s"] > 0


def test_loader_benchmark_tiny(digits_root):
    pytest.importorskip("nvidia.dali")
    out = last_json(call_tool("benchmarks/loader.py", "--data", str(digits_root), "--backend", "all",
                             "--batch", "4", "--iters", "2", "--warmup", "1", "--crop", "16",
                             "--threads", "2", "1", "--no-opens", "--ctaugment"))  # opens: the next test
    speed = {(r["backend"], r["threads"]): r["images_per_s"] for r in out["rows"]}
    assert all(r["ctaugment"] for r in out["rows"])  # each strong view through CTAugment after the stream
    assert set(speed) == {("dali", 1), ("dali", 2), ("torch", 1), ("torch", 2)} and min(speed.values()) > 0
    assert [r["images_per_s_per_thread"] for r in out["rows"] if r["threads"] == 2] == \
        [pytest.approx(speed[(b, 2)] / 2, abs=0.051) for b in ("dali", "torch")]
    # the backends compared at the most threads; the efficiency of each against its 1-thread row
    assert out["dali_over_torch"] == pytest.approx(speed[("dali", 2)] / speed[("torch", 2)], abs=0.01)
    assert out["parallel_efficiency"] == {
        f"{b}/folder/0ms@2": pytest.approx(speed[(b, 2)] / (2 * speed[(b, 1)]), abs=0.01) for b in ("dali", "torch")}
    for r in out["rows"]:  # the CPU utilisation: CPU per image x images per second, per thread
        # (/proc counts CPU time in 10 ms ticks: a run this short may count none)
        busy = r["cpu_ms_per_image"] * r["images_per_s"] / 1000
        assert 0 <= r["cores_busy"] == pytest.approx(busy, rel=0.1, abs=0.02)
        assert r["busy_per_thread"] == pytest.approx(r["cores_busy"] / r["threads"], abs=0.006)
    assert set(out["load_average"]) == {"before", "after", "cores"}


def test_loader_benchmark_shards_opens_and_open_delay(digits_root, tmp_path):
    """--format both with an injected open delay: the folder opens every image it reads, the
    shard set only its shard (once per process, before the timed batches here)."""
    import shutil

    pytest.importorskip("nvidia.dali")
    for tool in ("strace", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: the benchmark counts opens with strace and compiles its "
                        f"open-delay shim with gcc")
    from simmatch.shards.build import make_shards

    make_shards(digits_root, tmp_path / "shards", 64 * 10**6, show_progress=False, log=lambda *a: None)
    out = last_json(call_tool("benchmarks/loader.py", "--data", str(digits_root), "--shards", str(tmp_path / "shards"),
                             "--format", "both", "--backend", "dali", "--batch", "4", "--iters", "2",
                             "--warmup", "1", "--crop", "16", "--threads", "1", "--open-delay-ms", "1"))
    if out["opens_counted_by"] is None:  # strace is there but cannot trace (ptrace not permitted)
        pytest.skip(out["opens_note"])
    rows = {r["format"]: r for r in out["rows"]}
    assert set(rows) == {"folder", "shards"} and out["open_delay_ms"] == [1.0]
    assert "not a real network mount" in out["open_delay"] and out["opens_counted_by"] == "strace"
    folder, shards = rows["folder"], rows["shards"]
    assert folder["open_delay_ms"] == shards["open_delay_ms"] == 1.0
    # every image read (warm-up and timed batches) is a file of its own; the scan opens the class folders too
    assert folder["opens"] > 0 and folder["opens_whole_run"] >= 4 * 3
    assert shards["opens"] <= out["shard_opens_bound"] == out["shards"] * 1
    for r in (folder, shards):
        assert r["opens_per_1k_images"] == pytest.approx(1000 * r["opens"] / 8, abs=0.01)
        assert r["opens_per_epoch"] == pytest.approx(r["opens"] * r["epoch_images"] / 8, abs=0.1)
    assert out["shards_over_folder"]["dali"]["1"] == pytest.approx(
        shards["images_per_s"] / folder["images_per_s"], abs=0.01)


def test_bank_memory_benchmark_reads_the_banks_it_builds():
    out = last_json(call_tool("benchmarks/bank_memory.py", "--cfg", "yaml/in1k_1pct_v2.yaml", "--world-size", "1", "2"))
    for row, gpus in zip(out["rows"], (1, 2)):
        assert row["K"] == 256 * 40 * gpus and row["global_unlabeled"] == 40 * gpus
        # two fp32 tables, plus the ring's pointer and fill count (int64 each)
        assert row["unlabeled_bank_bytes"] == row["formula_bytes"] + 16 == row["K"] * (128 + 1000) * 4 + 16
        assert row["per_step_transient_bytes"] == (3 * 5 + 1) * 40 * row["K"] * 4


def test_step_benchmark_simmatchv2_with_multicrop_against_simmatch():
    out = last_json(call_tool("benchmarks/step.py", "--arch", "resnet10", "--crop", "16", "--classes", "10",
                             "--batch", "2", "--mu", "2", "--warmup", "1", "--iters", "2", "--method", "simmatchv2",
                             "--multicrop", "--compare", "simmatch", "--device", "cpu"))
    v2, simmatch = out["runs"]
    assert (v2["method"], simmatch["method"], out["multicrop"]) == ("simmatchv2", "simmatch", True)
    # 2 labeled + 4 unlabeled images: V2 sees each unlabeled one as a weak view and 5 crops
    assert v2["img_s"] == pytest.approx((2 + 4 * 6) / (v2["step_ms"] / 1e3))
    assert simmatch["img_s"] == pytest.approx((2 + 4 * 2) / (simmatch["step_ms"] / 1e3))
    assert out["ratio"] == pytest.approx(v2["step_ms"] / simmatch["step_ms"])


def test_table1_small_views_benchmark_tiny():
    """benchmarks/small_views.py: a rate for each backend's weak and strong view, and the JSON line."""
    pytest.importorskip("nvidia.dali")
    out = last_json(call_tool("benchmarks/small_views.py", "--side", "32", "--batch", "8", "--threads", "1",
                              "--iters", "1"))
    assert out["side"] == 32 and out["batch"] == 8
    assert all(out[f"{b}_{v}"] > 0 for b in ("dali", "torch") for v in ("weak", "strong")), out


def test_process_exit_benchmark_tiny():
    out = last_json(call_tool("benchmarks/process_exit.py", "--repeat", "1"))
    assert out["benchmark"] == "process_exit" and out["repeat"] == 1
    for mode in ("plain", "run_cli"):  # one child each: its median is its only run
        assert out[mode]["exit_s"] == out[mode]["exit_runs_s"][0] >= 0 and out[mode]["start_s"] > 0
