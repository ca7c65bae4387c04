"""Indexed tar shards (tools/make_shards.py, data.format=shards): the packing read back by Python's own
tarfile, the streams equal to the folder's batch for batch on both backends, and every bad-shard case
one line naming the shard. In process; the training runs are in tests/data/test_shards_training.py."""
from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import call_tool
from conftest_data import data_cfg, load_tool, same_batches, streams_for, take
from simmatch.data import load_splits
from simmatch.errors import ConfigError, DataError
from simmatch.images.tree import scan_tree
from simmatch.shards.build import make_shards, parse_size


def pack(src: Path, out: Path, size: str = "16KB", jobs: int = 1) -> Path:
    make_shards(src, out, parse_size(size), jobs, show_progress=False, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def digits_shards(digits_root, tmp_path_factory) -> Path:
    return pack(digits_root, tmp_path_factory.mktemp("digits_shards") / "out")


@pytest.fixture(scope="session")
def photo_shards(photo_root, tmp_path_factory) -> Path:
    return pack(photo_root, tmp_path_factory.mktemp("photo_shards") / "out", size="64KB")


@pytest.mark.parametrize("tree", ["digits", "photos"])
def test_shards_hold_every_image_in_the_webdataset_layout(tree, request):
    """Python's tarfile reads each shard: KEY.<ext> then KEY.cls per image, the image's bytes those of
    its file, the class its folder's number, the data offset and the shard's sha256 the index's."""
    src = request.getfixturevalue("digits_root" if tree == "digits" else "photo_root")
    out = request.getfixturevalue("digits_shards" if tree == "digits" else "photo_shards")
    for split in ("train", "val"):
        folder = scan_tree(src / split)
        lines = (out / f"{split}.index").read_text(encoding="utf-8").splitlines()
        import json

        header, rows = json.loads(lines[0]), [ln.split("\t") for ln in lines[1:]]
        assert [r[5] for r in rows] == folder.files and [int(r[3]) for r in rows] == folder.labels
        assert header["classes"] == folder.classes and len(header["shards"]) > 1
        seen = 0
        for k, shard in enumerate(header["shards"]):
            path = out / shard["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                assert len(members) == 2 * shard["images"]
                for image, cls in zip(members[::2], members[1::2]):
                    row = rows[seen]
                    rel = row[5]
                    assert int(row[0]) == k and image.offset_data == int(row[1]) and image.size == int(row[2])
                    assert tar.extractfile(image).read() == (src / split / rel).read_bytes()
                    key, ext = image.name.rsplit(".", 1)
                    assert "." not in key.split("/")[-1] and ext == rel.rsplit(".", 1)[1].lower()
                    assert cls.name == f"{key}.cls" and tar.extractfile(cls).read() == row[3].encode()
                    seen += 1
        assert seen == len(rows)


def test_shards_pack_is_the_same_bytes_with_other_jobs(digits_root, digits_shards, tmp_path):
    other = pack(digits_root, tmp_path / "other", jobs=2)
    for f in sorted(digits_shards.rglob("*")):
        if f.is_file():
            assert (other / f.relative_to(digits_shards)).read_bytes() == f.read_bytes(), f


def _cfgs(root: Path, shards: Path, backend: str, *extra: str):
    classes = len(scan_tree(root / "train").classes)
    common = [f"data.num_classes={classes}", "data.labeled_per_class=2", *extra]
    return (data_cfg(root, *common, backend=backend),
            data_cfg(root, *common, "data.format=shards", f"data.shards={shards}", "data.root=", backend=backend))


# the torch backend's DataLoader workers take seconds to start: in the full suite
@pytest.mark.parametrize("backend", ["dali", pytest.param("torch", marks=pytest.mark.slow)])
@pytest.mark.parametrize("tree", ["digits", "photos"])
def test_shards_streams_equal_the_folder(tree, backend, request):
    """Labeled, unlabeled and validation batches from the shards equal the folder's bit for bit, and
    a shard stream resumed from a saved position goes on like the folder stream; a control with
    another seed differs (the comparison can fail)."""
    root = request.getfixturevalue("digits_root" if tree == "digits" else "photo_root")
    shards = request.getfixturevalue("digits_shards" if tree == "digits" else "photo_shards")
    folder_cfg, shard_cfg = _cfgs(root, shards, backend)
    cpu = torch.device("cpu")
    a, b = streams_for(folder_cfg, 0, 1, cpu), streams_for(shard_cfg, 0, 1, cpu)
    for name in ("labeled", "unlabeled"):
        fa, fb = getattr(a, name), getattr(b, name)
        assert same_batches(take(fa, 2), take(fb, 2)), name
        saved = fb.state_dict()
        later = take(fb, 2)
        assert same_batches(later, take(fa, 2)), name
        again = streams_for(shard_cfg, 0, 1, cpu)
        getattr(again, name).load_state_dict(saved)
        assert same_batches(take(getattr(again, name), 2), later), name
        again.close()
    for x, y in zip(list(a.val()), list(b.val()), strict=True):
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"])
    control = streams_for(_cfgs(root, shards, backend, "train.seed=4")[1], 0, 1, cpu)
    assert not same_batches(take(control.unlabeled, 1), take(streams_for(folder_cfg, 0, 1, cpu).unlabeled, 1))
    for s in (a, b, control):
        s.close()


def _copy(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    return out


def _load(root: Path, out: Path):
    return load_splits(_cfgs(root, out, "dali")[1].data)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_shards_truncated_missing_or_foreign_is_named_before_anything_runs(digits_root, digits_shards, tmp_path):
    out = _copy(digits_shards, tmp_path)
    shard = out / "train" / "000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-700])
    with pytest.raises(DataError) as exc:
        _load(digits_root, out)
    assert str(shard) in one_line(exc) and "truncated" in str(exc.value)
    shard.unlink()
    with pytest.raises(DataError) as exc:
        _load(digits_root, out)
    assert f"shard missing: {shard}" in one_line(exc)
    shard.write_bytes(data)
    _load(digits_root, out)  # whole again
    other = pack(digits_root, tmp_path / "other", size="24KB")  # another packing's index, with its digest
    shutil.copy(other / "train.index", out / "train.index")
    shutil.copy(other / "train.index.sha256", out / "train.index.sha256")
    with pytest.raises(DataError) as exc:
        _load(digits_root, out)
    assert "train/000000.tar" in one_line(exc) and "index" in str(exc.value)
    shutil.copy(digits_shards / "train.index.sha256", out / "train.index.sha256")  # without it: the digest says
    with pytest.raises(DataError) as exc:
        _load(digits_root, out)
    assert f"{out / 'train.index'} does not match its digest" in one_line(exc)


def test_shards_altered_image_is_named_with_its_shard(digits_root, digits_shards, tmp_path):
    """Altered bytes of one image: its read fails naming the shard and the image (CRC-32), the
    decode check before step 1 names it, and check_data's sha256 names the shard (exit 1)."""
    out = _copy(digits_shards, tmp_path)
    splits = _load(digits_root, out)
    rel = splits.labeled_files[0]
    index = splits.train_source.index
    row = index.row(rel)
    shard = index.shard_path(int(index.shard[row]))
    with open(shard, "r+b") as f:
        f.seek(int(index.offset[row]) + 40)
        f.write(b"\x00\xff\x00")
    splits = _load(digits_root, out)  # sizes and headers unchanged: the quick check passes
    with pytest.raises(DataError) as exc:
        splits.train_source.read(rel)
    assert str(shard) in one_line(exc) and rel in str(exc.value) and "damaged" in str(exc.value)
    from simmatch.images.decode import find_undecodable

    assert [w for w, _ in find_undecodable([(splits.train_source, rel)])] == [splits.train_source.where(rel)]
    res = call_tool("tools/check_data.py", str(out), "--quiet")
    assert res.returncode == 1 and f"{shard}: its sha256 differs" in res.stdout and rel in res.stdout
    assert call_tool("tools/check_data.py", str(digits_shards), "--quiet").returncode == 0
    check = ["tools/train.py", "--cfg", "yaml/digits.yaml", "data.format=shards", f"data.shards={out}",
             f"train.run_dir={tmp_path / 'run'}", "--check", "--full"]
    res = call_tool(*check)
    failed = [ln for ln in res.stdout.splitlines() if ln.startswith("FAIL")]
    assert res.returncode != 0 and len(failed) == 2, res.stdout  # the sha256 and the decode of every image
    assert f"{shard}: its sha256 differs" in failed[0] and rel in failed[0] and rel in failed[1]


def test_shards_config_names_what_is_missing(digits_root, tmp_path):
    with pytest.raises(ConfigError, match="data.shards"):
        data_cfg(digits_root, "data.format=shards")
    cfg = data_cfg(digits_root, "data.format=shards", f"data.shards={tmp_path}")
    from simmatch.shards.formats import require_data_dirs

    with pytest.raises(DataError, match="shard index not found"):
        require_data_dirs(cfg.data)


def test_shards_print_config_counts_from_the_index(digits_root, digits_shards):
    import json

    folder = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", f"data.root={digits_root}", "--print-config")
    shards = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "data.format=shards",
                       f"data.shards={digits_shards}", "data.root=", "--print-config")
    assert folder.returncode == shards.returncode == 0, shards.stderr
    a, b = json.loads(folder.stdout.splitlines()[-1]), json.loads(shards.stdout.splitlines()[-1])
    assert b["sizes_from"] == f"shard index {digits_shards / 'train.index'}"
    assert b["num_unlabeled"] == len(scan_tree(digits_root / "train")) and b["num_labeled"] == a["num_labeled"]
    assert {k: v for k, v in a.items() if k != "sizes_from"} == {k: v for k, v in b.items() if k != "sizes_from"}


def test_shards_make_shards_refuses_another_tree_in_an_unfinished_folder(digits_root, photo_root, tmp_path):
    out = tmp_path / "out"
    (out / ".build").mkdir(parents=True)
    (out / ".build" / "plan.json").write_text('{"fingerprint": "x", "src": "/elsewhere", "shard_size": 1}')
    tool = load_tool("make_shards")
    res = call_tool("tools/make_shards.py", str(digits_root), str(out), "--quiet")
    assert res.returncode != 0 and "unfinished packing of another tree" in res.stderr
    assert tool.parse_size("1GB") == 10**9 and tool.parse_size("2MiB") == 2 << 20


@pytest.mark.slow  # several stream sets built (5 s)
def test_shards_elastic_and_virtual_ranks_read_what_the_folder_reads(digits_root, digits_shards):
    """Positions saved by 2 ranks resumed on 3 (an elastic resume), and 3 virtual ranks in one process:
    every rank's next batches from the shards equal the folder's (DALI; the torch backend's shard
    batches equal the folder's in test_shards_streams_equal_the_folder, and its elastic and virtual
    positions are the backend's own, tests/engine/test_elastic.py)."""
    backend = "dali"
    cpu = torch.device("cpu")
    got = {}
    for fmt, cfg in zip(("folder", "shards"), _cfgs(digits_root, digits_shards, backend, "train.batch_size=12")):
        old = [streams_for(cfg, r, 2, cpu) for r in range(2)]
        for s in old:
            take(s.unlabeled, 3)
        saved = old[0].unlabeled.state_dict()
        new = [streams_for(cfg, r, 3, cpu) for r in range(3)]
        for s in new:
            s.unlabeled.load_state_dict(saved)
        got[fmt] = [take(s.unlabeled, 2) for s in new]
        virtual = streams_for(_virtual(cfg), 0, 1, cpu)
        got[fmt] += [take(r.labeled, 2) + take(r.unlabeled, 2) for r in virtual.train]
        for s in old + new + [virtual]:
            s.close()
    assert len(got["shards"]) == 6
    assert all(same_batches(a, b) for a, b in zip(got["folder"], got["shards"], strict=True))


def _virtual(cfg):
    from simmatch.config import apply_overrides

    return apply_overrides(cfg, ["train.virtual_world_size=3"])


def test_shards_a_second_make_shards_on_the_same_folder_is_refused(digits_root, tmp_path):
    """While one build holds OUT/.build/lock (an flock, as a running make_shards.py does), another is
    refused in one line and writes nothing; once the lock is free the build runs."""
    import fcntl

    out = tmp_path / "out"
    (out / ".build").mkdir(parents=True)
    with open(out / ".build" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = call_tool("tools/make_shards.py", str(digits_root), str(out), "--quiet")
        assert res.returncode == 2 and "being packed by another make_shards.py" in res.stderr
        assert sorted(p.name for p in out.rglob("*")) == [".build", "lock"]
    assert call_tool("tools/make_shards.py", str(digits_root), str(out), "--quiet").returncode == 0
    assert (out / "train.index").is_file() and not (out / ".build").exists()


def test_shards_reads_from_many_threads_through_one_open_shard_stay_exact(digits_root, digits_shards):
    """data.max_open_shards=1 and 8 threads reading every image in a shuffled order: shards are
    evicted while other threads read through them, and every read still returns the image's own
    bytes; no descriptor is left open once the cache is closed."""
    import os
    import random
    from concurrent.futures import ThreadPoolExecutor

    from simmatch.shards.index import read_index
    from simmatch.shards.source import ShardSource

    index = read_index(digits_shards, "train")
    source = ShardSource(index, 1)
    paths = list(index.paths) * 2
    random.Random(0).shuffle(paths)
    before = len(os.listdir("/proc/self/fd"))
    with ThreadPoolExecutor(8) as pool:
        data = list(pool.map(source.read, paths))
    assert all(d == (digits_root / "train" / p).read_bytes() for d, p in zip(data, paths))
    assert source.files.opens > len(index.shards)  # shards were evicted and opened again
    source.files.close()
    assert len(os.listdir("/proc/self/fd")) <= before
