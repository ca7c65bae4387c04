"""Training from indexed tar shards is the same run as from the folder: 12 steps give bit-identical
checkpoints on both backends, on 4 gloo ranks too; a SIGTERM mid-run on shards resumes bit-identically;
a killed tools/make_shards.py resumes to the same shards; a bad shard or an edited index stops a run in
one line and leaves its checkpoints as they were; a set packed with --skip-bad, holding images whose
paths differ only by the extension, trains."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_shards import pack
from test_shards_integrity import small_tree

from conftest import (
    FOUR_RANKS,
    ROOT,
    assert_same_weights,
    call_tool,
    final_state,
    four_rank_overrides,
    resume_copy,
    run_tool,
    stop_after_checkpoint,
    tiny_overrides,
)

pytestmark = pytest.mark.slow
ITERS = 12


@pytest.fixture(scope="session")
def shards_for_training(digits_root, tmp_path_factory) -> Path:
    return pack(digits_root, tmp_path_factory.mktemp("train_shards") / "out")


def overrides(root: Path, shards: Path, run_dir: Path, fmt: str, backend: str, **more) -> list[str]:
    """ITERS steps in one process, a checkpoint every 3; the shard runs get no data.root at all, so
    nothing can come from the folder. The torch backend reads in the training process (its
    worker processes read shards in tests/data/test_shards.py)."""
    extra = {"data.backend": backend, "optim.iters": ITERS, "train.ckpt_every": 3,
             "data.num_threads": 0 if backend == "torch" else 1, **more}
    if fmt == "shards":
        extra.update({"data.format": "shards", "data.shards": str(shards), "data.root": ""})
    return ["--cfg", "yaml/digits.yaml", *tiny_overrides(root, run_dir, **extra)]


@pytest.fixture(scope="session")
def photo_shards_for_training(photo_root, tmp_path_factory) -> Path:
    return pack(photo_root, tmp_path_factory.mktemp("train_photo_shards") / "out", size="64KB")


@pytest.fixture(scope="session")
def finished(digits_root, shards_for_training, photo_root, photo_shards_for_training, tmp_path_factory):
    """finished(fmt, backend, tree): the run directory of that run on the digits (or the photos of
    tests/data/test_shards.py), trained once per session in this process, counting the shard files
    it opened."""
    from simmatch.shards.source import shard_opens

    runs: dict[tuple, Path] = {}

    def get(fmt: str, backend: str, tree: str = "digits") -> Path:
        key = (fmt, backend, tree)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(f"{fmt}_{backend}_{tree}") / "run"
            root, shards = ((digits_root, shards_for_training) if tree == "digits"
                            else (photo_root, photo_shards_for_training))
            photos = {} if tree == "digits" else {"data.num_classes": 3, "data.crop_size": 32, "data.val_resize": 36}
            args = overrides(root, shards, run_dir, fmt, backend, **photos)
            opened = shard_opens()
            res = call_tool("tools/train.py", *args)
            assert res.returncode == 0, res.stderr[-3000:]
            assert (shard_opens() > opened) == (fmt == "shards")  # the shard runs read the shards
            runs[key] = run_dir
        return runs[key]

    return get


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("tree", ["digits", "photos"])
def test_shards_training_equals_the_folder(finished, backend, tree):
    a, b = final_state(finished("folder", backend, tree=tree)), final_state(finished("shards", backend, tree=tree))
    assert a["iteration"] == ITERS
    assert_same_weights(a, b)
    assert b["config"]["data"]["format"] == "shards"


@pytest.mark.timeout(900)
def test_shards_four_ranks_equal_four_ranks_on_the_folder(digits_root, shards_for_training, four_rank_reference,
                                                          tmp_path):
    """4 gloo ranks reading their shares of the shards end bit-identical to conftest's 4-rank
    reference run on the folder."""
    run_dir = tmp_path / "run"
    shards = {"data.format": "shards", "data.shards": str(shards_for_training), "data.root": ""}
    res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--nproc", "4",
                   *four_rank_overrides(digits_root, run_dir, **shards), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = final_state(four_rank_reference), final_state(run_dir)
    assert a["iteration"] == FOUR_RANKS["optim.iters"] and a["world_size"] == 4
    assert_same_weights(a, b)
    assert b["config"]["data"]["format"] == "shards" and a["config"]["data"]["format"] == "folder"


@pytest.mark.timeout(900)
def test_shards_sigterm_then_resume_is_bit_identical(digits_root, shards_for_training, finished, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(digits_root, shards_for_training, run_dir, "shards", "dali")
    assert stop_after_checkpoint(["tools/train.py", *args], run_dir, 3) < ITERS, "the signal came too late"
    res = call_tool("tools/train.py", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (run_dir / "log_rank0.txt").read_text()
    assert_same_weights(final_state(run_dir), final_state(finished("shards", "dali")))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.timeout(600)
def test_shards_killed_make_shards_resumes_to_the_same_shards(digits_root, shards_for_training, tmp_path):
    """SIGKILL mid-build (one image per shard: many fsyncs), then the same command: every shard and
    index equal an uninterrupted build's (sha256); after the kill no shard under its final name
    differs from the finished one (none is half-written)."""
    whole = pack(digits_root, tmp_path / "whole", size="4KB")
    out = tmp_path / "killed"
    cmd = [sys.executable, "tools/make_shards.py", str(digits_root), str(out), "--shard-size", "4KB",
           "--jobs", "1", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "train").glob("*.tar"))) < 100:
        assert proc.poll() is None, "the build ended before the kill"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    written = list((out / "train").glob("*.tar"))
    assert 100 <= len(written) < len(list((whole / "train").glob("*.tar")))
    assert all(f.read_bytes() == (whole / "train" / f.name).read_bytes() for f in written)
    res = run_tool(*cmd[1:])
    assert res.returncode == 0, res.stderr
    assert "resuming:" in res.stdout
    assert _tree_digest(out) == _tree_digest(whole)


@pytest.mark.timeout(900)
def test_shards_bad_shard_stops_the_run_in_one_line_and_loses_nothing(digits_root, shards_for_training, finished,
                                                                     tmp_path):
    """A finished shard run continued for more steps over a truncated shard, a missing one, a foreign
    index, and an altered unlabeled image (read only in training): exit 2, one line naming the shard
    (and the image), the run directory's files unchanged byte for byte."""
    import shutil

    import torch

    from conftest_data import streams_for
    from simmatch.config import load_config
    from simmatch.data import load_splits

    out = tmp_path / "shards"
    shutil.copytree(shards_for_training, out)
    run_dir = tmp_path / "run"
    shutil.copytree(finished("shards", "dali"), run_dir, symlinks=True)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace(str(shards_for_training), str(out)).replace(
        str(finished("shards", "dali")), str(run_dir)))
    args = [*overrides(digits_root, out, run_dir, "shards", "dali"), "optim.iters=30", "--allow-config-change"]
    before = kept(run_dir)

    def stopped(*needles: str) -> None:
        res = call_tool("tools/train.py", *args)
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
        assert all(n in lines[0] for n in needles), lines[0]
        assert kept(run_dir) == before

    shard = out / "train" / "000005.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    stopped(str(shard), "truncated")
    shard.unlink()
    stopped(f"shard missing: {shard}")
    shard.write_bytes(data)
    index, digest = (out / "train.index").read_bytes(), (out / "train.index.sha256").read_bytes()
    other = pack(digits_root, tmp_path / "other", size="24KB")
    shutil.copy(other / "train.index", out / "train.index")
    shutil.copy(other / "train.index.sha256", out / "train.index.sha256")
    stopped("does not match its index")
    (out / "train.index.sha256").write_bytes(digest)
    stopped(str(out / "train.index"), "does not match its digest")
    lines = index.decode().split("\n")  # an image's class edited: what a resume used to accept
    first = lines[1].split("\t")
    lines[1] = "\t".join([*first[:3], str((int(first[3]) + 1) % 10), *first[4:]])
    (out / "train.index").write_text("\n".join(lines))
    stopped(str(out / "train.index"), "does not match its digest")
    (out / "train.index").write_bytes(index)
    cfg = load_config(ROOT / "yaml/digits.yaml", [a for a in args if "=" in a])
    streams = streams_for(cfg, 0, 1, torch.device("cpu"), frozen_splits=run_dir / "splits")
    first = streams.unlabeled.plan.rank_order(0)[ITERS * 16]  # the first unlabeled image after the run
    rel = streams.split_lists["unlabeled"][first]
    src = load_splits(cfg.data).train_source
    row = src.index.row(rel)
    target = src.index.shard_path(int(src.index.shard[row]))
    with open(target, "r+b") as f:
        f.seek(int(src.index.offset[row]) + 30)
        f.write(b"\x01\x02\x03")
    stopped(str(target), rel, "damaged")



def kept(run_dir: Path) -> dict[str, str]:
    """sha256 of what a failed start must leave as it was: the checkpoints and split lists (config.yaml
    takes the accepted longer schedule)."""
    return {k: v for k, v in _tree_digest(run_dir).items() if k.startswith(("checkpoints/", "splits/"))}


@pytest.mark.timeout(900)
def test_shards_a_folder_run_continues_on_its_shards(digits_root, shards_for_training, finished, tmp_path):
    """The folder run's checkpoint of step 9, resumed with data.format=shards (its DALI position was
    saved by the file reader: the shard stream reaches it by running the segment's first batches
    again), ends bit-identical to the uninterrupted folder run."""

    whole = finished("folder", "dali")
    run_dir = resume_copy(whole, tmp_path / "run", 9)
    res = call_tool("tools/train.py", *overrides(digits_root, shards_for_training, run_dir, "shards", "dali"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (run_dir / "log_rank0.txt").read_text()
    assert_same_weights(final_state(run_dir), final_state(whole))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_shards_packed_with_skip_bad_train_with_both_dup_images(digits_root, tmp_path, backend):
    """tools/make_shards.py on the command line: without --skip-bad exit 2 naming the truncated JPEG;
    with it the set (dup.jpg and dup.png inside, the bad images left out) trains a tiny run on shards
    alone, whose unlabeled split holds both dup images and neither bad one."""
    src = small_tree(digits_root, tmp_path / "src")
    out = tmp_path / "out"
    res = run_tool("tools/make_shards.py", str(src), str(out), "--quiet", "--shard-size", "8KB")
    assert res.returncode == 2 and str(src / "train" / "1" / "bad.jpg") in res.stderr and not out.exists()
    res = run_tool("tools/make_shards.py", str(src), str(out), "--quiet", "--shard-size", "8KB", "--skip-bad")
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "run"
    args = tiny_overrides(src, run_dir, **{"data.format": "shards", "data.shards": str(out), "data.root": "",
                                          "data.backend": backend, "data.num_threads": 0 if backend == "torch" else 1,
                                          "data.num_classes": 2, "data.labeled_per_class": 2, "optim.iters": 4})
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert final_state(run_dir)["iteration"] == 4
    unlabeled = (run_dir / "splits" / "unlabeled.txt").read_text().split()
    assert {"0/dup.jpg", "0/dup.png"} <= set(unlabeled)
    assert not {"1/bad.jpg", "0/junk.jpg"} & set(unlabeled) and len(unlabeled) == 18
