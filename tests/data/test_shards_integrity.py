"""What tools/make_shards.py refuses to pack and what a shard set refuses to be read with: an image that
does not decode stops the build (or is left out with --skip-bad, listed); an edited index (a class
changed, two paths swapped, an unlabeled image's class) is refused at every start in one line, and
named line by line by check_data even when its digest was rewritten with it; images whose keys would
collide (`dup.jpg`, `dup.png`) get distinct member keys; a bad image of a shard is named with its
shard and byte offset, without a Python object's repr. In process; the training runs on such sets
are in tests/data/test_shards_training.py."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from test_shards import _cfgs, one_line, pack

from conftest import call_tool
from simmatch.data import load_splits
from simmatch.errors import DataError
from simmatch.images.decode import image_problem
from simmatch.images.tree import scan_tree
from simmatch.run.dropped import as_listed
from simmatch.shards.index import member_keys, read_index


def small_tree(digits_root: Path, root: Path, bad: bool = True, dup: bool = True) -> Path:
    """Digits classes 0 and 1 (8 train, 3 val images each); with `bad` a truncated JPEG
    train/1/bad.jpg and a file of random bytes train/0/junk.jpg; with `dup` train/0/dup.jpg and
    train/0/dup.png (two real images whose paths differ only by the extension)."""
    for split, count in (("train", 8), ("val", 3)):
        for cls in ("0", "1"):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((digits_root / split / cls).iterdir())[:count]:
                shutil.copy(src, root / split / cls / src.name)
    donors = sorted((digits_root / "train" / "2").iterdir())
    if bad:
        good = donors[0].read_bytes()
        (root / "train" / "1" / "bad.jpg").write_bytes(good[: len(good) // 3])
        (root / "train" / "0" / "junk.jpg").write_bytes(bytes(range(256)) * 3)
    if dup:
        shutil.copy(donors[1], root / "train" / "0" / "dup.jpg")
        Image.open(donors[2]).save(root / "train" / "0" / "dup.png")
    return root


@pytest.fixture(scope="module")
def shards(digits_root, tmp_path_factory) -> Path:
    return pack(digits_root, tmp_path_factory.mktemp("integrity_shards") / "out")


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def test_make_shards_stops_at_an_undecodable_image_and_packs_nothing(digits_root, tmp_path):
    """Exit 2 and one error line naming both bad files by their source path, their count and
    --skip-bad; OUT is not even created (an existing empty OUT stays empty). The control:
    --no-check packs the same tree (what happened before the decode pass)."""
    src = small_tree(digits_root, tmp_path / "src")
    out = tmp_path / "out"
    res = call_tool("tools/make_shards.py", str(src), str(out), "--quiet", "--shard-size", "8KB")
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr
    assert f"{src / 'train' / '1' / 'bad.jpg'} (" in errors[0] and f"{src / 'train' / '0' / 'junk.jpg'} (" in errors[0]
    assert "2 images" in errors[0] and "--skip-bad" in errors[0] and "0x" not in errors[0]
    assert not out.exists()
    out.mkdir()
    assert call_tool("tools/make_shards.py", str(src), str(out), "--quiet").returncode == 2
    assert list(out.iterdir()) == []
    res = call_tool("tools/make_shards.py", str(src), str(out), "--quiet", "--no-check", "--shard-size", "8KB")
    assert res.returncode == 0, res.stderr
    assert "1/bad.jpg" in read_index(out, "train").paths


def test_make_shards_skip_bad_leaves_them_out_and_lists_them(digits_root, tmp_path):
    """--skip-bad: skipped.txt holds `split <TAB> path <TAB> reason` per left-out image, the train
    index's header the same (path, reason), its lines every other image of the tree; a second start
    on the finished folder says it is packed."""
    src = small_tree(digits_root, tmp_path / "src")
    out = tmp_path / "out"
    res = call_tool("tools/make_shards.py", str(src), str(out), "--quiet", "--skip-bad", "--shard-size", "8KB")
    assert res.returncode == 0, res.stderr
    assert "2 left out" in res.stdout
    lines = [ln.split("\t") for ln in (out / "skipped.txt").read_text().splitlines()]
    assert [ln[:2] for ln in lines] == [["train", "0/junk.jpg"], ["train", "1/bad.jpg"]]
    assert lines[0][2] == "cannot identify image file" and "truncated" in lines[1][2].lower()
    for _, rel, reason in lines:  # the reason is the decoder's own (JPEGs decoded at 1/8 scale)
        assert image_problem(src / "train" / rel, fast=True) == reason
    header = json.loads((out / "train.index").read_text().splitlines()[0])
    assert header["skipped"] == [{"path": p, "reason": r} for _, p, r in lines]
    assert json.loads((out / "val.index").read_text().splitlines()[0])["skipped"] == []
    kept = [f for f in scan_tree(src / "train").files if f not in ("0/junk.jpg", "1/bad.jpg")]
    index = read_index(out, "train")
    assert index.paths == kept and index.skipped == {p: r for _, p, r in lines}
    with pytest.raises(DataError, match="left out of .*skipped.txt"):
        index.row("1/bad.jpg")
    again = call_tool("tools/make_shards.py", str(src), str(out), "--quiet", "--skip-bad")
    assert again.returncode == 0 and "already packed" in again.stdout


class Killed(BaseException):
    pass


def test_make_shards_skip_bad_resumes_to_the_same_bytes_and_remembers_what_it_left_out(digits_root, tmp_path,
                                                                                     monkeypatch):
    """A --skip-bad build stopped after 3 shards and started again ends byte-identical to an
    uninterrupted one, without decoding again (the decode result is kept); started again with
    --no-check instead (which would pack the bad images), or with the bad images gone from the tree
    (the same images packed, none left out), it is refused as another packing."""
    import simmatch.shards.build as build

    src = small_tree(digits_root, tmp_path / "src")
    whole = tmp_path / "whole"
    build.make_shards(src, whole, 4000, show_progress=False, log=lambda *a: None, skip_bad=True)
    out = tmp_path / "out"
    real, written = build.write_shard, []

    def dies_after_three(*args):
        if len(written) == 3:
            raise Killed
        written.append(real(*args))
        return written[-1]

    monkeypatch.setattr(build, "write_shard", dies_after_three)
    with pytest.raises(Killed):
        build.make_shards(src, out, 4000, show_progress=False, log=lambda *a: None, skip_bad=True)
    monkeypatch.setattr(build, "write_shard", real)
    with pytest.raises(DataError, match="unfinished packing of another tree .* 2 undecodable images left out"):
        build.make_shards(src, out, 4000, show_progress=False, log=lambda *a: None, check=False)
    kept = {p: (p.read_bytes(), p.stat()) for p in (src / "train" / "1" / "bad.jpg", src / "train" / "0" / "junk.jpg")}
    for p in kept:  # the same images packed, but none left out: another packing (its headers differ)
        p.unlink()
    with pytest.raises(DataError, match="unfinished packing of another tree"):
        build.make_shards(src, out, 4000, show_progress=False, log=lambda *a: None, skip_bad=True)
    for p, (data, st) in kept.items():
        p.write_bytes(data)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    decoded = []
    monkeypatch.setattr(build, "decode_all", lambda *a, **k: decoded.append(a) or [])
    log: list[str] = []
    build.make_shards(src, out, 4000, show_progress=False, log=log.append, skip_bad=True)
    assert not decoded and any("resuming: 3 of" in ln for ln in log)
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all((whole / f).read_bytes() == (out / f).read_bytes() for f in files)


def _pack_with_bad(digits_root: Path, tmp_path: Path) -> Path:
    src = small_tree(digits_root, tmp_path / "src")
    out = tmp_path / "out"
    call_tool("tools/make_shards.py", str(src), str(out), "--quiet", "--no-check", "--shard-size", "8KB")
    return out


def test_a_bad_image_in_a_shard_is_named_with_its_shard_and_offset(digits_root, tmp_path):
    """where() gives the path, the shard and the image's byte offset there, the offset being the one
    Python's tarfile finds for its member; --drop-images reads the path back. check_data --full names both
    bad images by where, reasons without any object repr; PIL's own error on the bytes of a shard
    names the image, not `<_io.BytesIO object at 0x...>`; altered bytes name shard, path and bytes."""
    out = _pack_with_bad(digits_root, tmp_path)
    index = read_index(out, "train")
    cfg = _cfgs(tmp_path / "src", out, "dali", "data.num_classes=2")[1]
    source = load_splits(cfg.data).train_source
    for rel in ("0/junk.jpg", "1/bad.jpg"):
        shard = index.shard_path(int(index.shard[index.row(rel)]))
        offset = next(m.offset_data for m in members(shard) if m.name.startswith(rel.split(".")[0] + "."))
        assert source.where(rel) == f"{rel} (in shard {shard} at offset {offset})"
        assert as_listed(source.where(rel), {rel}, None) == rel  # a drop file may name it so
    res = call_tool("tools/check_data.py", str(out), "--full", "--quiet")
    assert res.returncode == 1, res.stdout
    problems = [ln.strip() for ln in res.stdout.splitlines() if ln.startswith("  ")]
    truncated = image_problem(tmp_path / "src" / "train" / "1" / "bad.jpg")
    assert problems == [f"{source.where('0/junk.jpg')}: cannot decode: cannot identify image file",
                        f"{source.where('1/bad.jpg')}: cannot decode: {truncated}"]
    assert "0x" not in res.stdout and "object at" not in res.stdout
    with pytest.raises(OSError) as exc:
        Image.open(source.open("0/junk.jpg"))
    assert "0/junk.jpg" in str(exc.value) and "0x" not in str(exc.value)
    assert image_problem(io.BytesIO(b"not an image")) == "cannot identify image file"
    row = index.row(next(p for p in index.paths if p.startswith("1/") and p != "1/bad.jpg"))
    rel, shard, offset = index.paths[row], index.shard_path(int(index.shard[row])), int(index.offset[row])
    with open(shard, "r+b") as f:
        f.seek(offset + 20)
        f.write(b"\xff\x00\xff")
    with pytest.raises(DataError) as exc:
        source.read(rel)
    assert str(shard) in one_line(exc) and rel in str(exc.value) and f"bytes {offset}-" in str(exc.value)


def _edit(out: Path, edit) -> list[list[str]]:
    """Apply `edit(lines)` to train.index's image lines (tab-split, in place); return them."""
    path = out / "train.index"
    text = path.read_text(encoding="utf-8").splitlines()
    rows = [ln.split("\t") for ln in text[1:]]
    edit(rows)
    path.write_text("\n".join([text[0], *("\t".join(r) for r in rows)]) + "\n", encoding="utf-8")
    return rows


def _redigest(out: Path) -> None:
    """What an editor that also knows the sidecar would do: the digest of the edited index."""
    path = out / "train.index"
    (out / "train.index.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  train.index\n")


def _edits(labeled: str, unlabeled: str, other: str):
    def class_of(rel):
        def edit(rows):
            row = next(r for r in rows if r[5] == rel)
            row[3] = str((int(row[3]) + 1) % 10)
        return edit

    def swap(rows):
        a, b = next(r for r in rows if r[5] == labeled), next(r for r in rows if r[5] == other)
        a[5], b[5] = b[5], a[5]

    return {"labeled class": class_of(labeled), "swapped paths": swap, "unlabeled class": class_of(unlabeled)}


@pytest.mark.parametrize("edit", ["labeled class", "swapped paths", "unlabeled class"])
def test_an_edited_index_is_refused_at_start_and_named_line_by_line(digits_root, shards, tmp_path, edit):
    """Each edit: every start (load_splits, tools/train.py --check) refuses it in one line naming
    the index and saying to pack again. With the sidecar rewritten too, the start cannot tell, but
    check_data and --check --full name the edited lines (shard, path, offset) against the tar. The
    control: the unedited copy loads and checks clean."""
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    cfg = _cfgs(digits_root, out, "dali")[1]
    splits = load_splits(cfg.data)
    labeled = splits.labeled_files[0]
    unlabeled = next(f for f in splits.unlabeled_files if f not in set(splits.labeled_files))
    other = next(f for f in splits.unlabeled_files if f.split("/")[0] != labeled.split("/")[0])
    assert call_tool("tools/check_data.py", str(out), "--quiet").returncode == 0
    _edit(out, _edits(labeled, unlabeled, other)[edit])
    with pytest.raises(DataError) as exc:
        load_splits(cfg.data)
    assert f"{out / 'train.index'} does not match its digest" in one_line(exc) and "pack the data" in str(exc.value)
    check = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "data.format=shards", f"data.shards={out}",
                      "data.root=", f"train.run_dir={tmp_path / 'run'}", "--check")
    assert check.returncode != 0 and "does not match its digest" in check.stdout + check.stderr
    _redigest(out)
    splits = load_splits(cfg.data)  # the digest matches now: only the shards can tell
    named = [labeled, other] if edit == "swapped paths" else [labeled if edit == "labeled class" else unlabeled]
    res = call_tool("tools/check_data.py", str(out), "--quiet")
    bad = [ln.strip() for ln in res.stdout.splitlines() if ln.startswith("  ")]
    assert res.returncode == 1 and len(bad) == len(named), res.stdout
    for rel, line in zip(sorted(named, key=splits.train_source.index.row), bad):
        assert line.startswith(splits.train_source.where(rel) + ": ")
        assert ("class" if "class" in edit else "not ") in line and "was edited" in line
    full = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "data.format=shards", f"data.shards={out}",
                     "data.root=", f"train.run_dir={tmp_path / 'run'}", "--check", "--full")
    failed = [ln for ln in full.stdout.splitlines() if ln.startswith("FAIL")]
    assert full.returncode != 0 and any(named[0] in ln and "was edited" in ln for ln in failed), full.stdout


def test_an_index_without_digest_of_an_earlier_format_with_a_path_twice_or_of_the_other_split_is_refused(
        digits_root, shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    sidecar = out / "train.index.sha256"
    kept = sidecar.read_bytes()
    sidecar.unlink()
    with pytest.raises(DataError) as exc:
        read_index(out, "train")
    assert "has no digest (train.index.sha256 is missing)" in one_line(exc)
    sidecar.write_bytes(kept)
    read_index(out, "train")
    rows = _edit(out, lambda rows: rows[1].__setitem__(5, rows[0][5]))
    _redigest(out)
    with pytest.raises(DataError) as exc:
        read_index(out, "train")
    assert f"lists {rows[0][5]} more than once" in one_line(exc)
    path = out / "train.index"
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    header["version"] = 1
    del header["skipped"]
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    sidecar.unlink()
    with pytest.raises(DataError) as exc:
        read_index(out, "train")
    assert "packed by an earlier tools/make_shards.py (index format 1" in one_line(exc)
    assert "pack the data set again" in str(exc.value)
    with pytest.raises(DataError, match="holds shards of another index format \\(1; this version writes 2\\)"):
        pack(digits_root, out)  # not taken for a finished packing of this version
    shutil.copy(out / "val.index", out / "train.index")  # the other split's index, with its digest
    shutil.copy(out / "val.index.sha256", sidecar)
    with pytest.raises(DataError) as exc:
        read_index(out, "train")
    assert "its header names split 'val', not 'train'" in one_line(exc)


def test_paths_that_differ_by_their_extension_get_distinct_member_keys(digits_root, tmp_path):
    """dup.jpg and dup.png: members 0/dup%2Ejpg.jpg and 0/dup%2Epng.png (webdataset's key, the name
    up to the basename's first dot, differs), each followed by its .cls; other images keep the key
    without extension; both read back as their own files. member_keys stays unique on harder names."""
    src = small_tree(digits_root, tmp_path / "src", bad=False)
    out = pack(src, tmp_path / "out", size="64KB")
    names = [m.name for shard in sorted((out / "train").glob("*.tar")) for m in members(shard)]
    assert "0/dup%2Ejpg.jpg" in names and "0/dup%2Epng.png" in names
    assert names[names.index("0/dup%2Ejpg.jpg") + 1] == "0/dup%2Ejpg.cls"
    assert names[names.index("0/dup%2Epng.png") + 1] == "0/dup%2Epng.cls"
    keys = [n.rsplit("/", 1)[0] + "/" + n.rsplit("/", 1)[1].split(".")[0] for n in names]
    assert all(keys.count(k) == 2 for k in keys)  # one image and one .cls per webdataset key
    first = sorted((src / "train" / "0").iterdir())[0]
    assert f"0/{first.stem}.{first.suffix[1:]}" in names
    index = read_index(out, "train")
    cfg = _cfgs(src, out, "dali", "data.num_classes=2")[1]
    source = load_splits(cfg.data).train_source
    for rel in ("0/dup.jpg", "0/dup.png"):
        assert source.read(rel) == (src / "train" / rel).read_bytes() and rel in index.paths
    assert call_tool("tools/check_data.py", str(out), "--quiet", "--full").returncode == 0
    hard = ["a/x.jpg", "a/x.png", "a/x.jpg.png", "a/x.jpg.png.gif", "a/y%2Ejpg.jpg", "a/y.jpg", "a/y.png", "a/z.jpg"]
    keys = member_keys(hard)
    assert len(set(keys)) == len(hard) and keys[-1] == "a/z" and keys[0] == "a/x%2Ejpg"
    assert member_keys(hard) == keys


def test_the_header_walk_finds_what_tarfile_finds(photo_root, tmp_path):
    """tar_members (the index-line check's own header walk) against Python's tarfile on shards with
    a dotted stem, a non-ASCII name and one that needs a PAX header: the same names, data offsets and
    sizes; a cut-off shard is a ValueError, not a short list."""
    from simmatch.shards.verify import tar_members

    out = pack(photo_root, tmp_path / "out", size="64KB")
    shards = sorted((out / "train").glob("*.tar")) + sorted((out / "val").glob("*.tar"))
    for shard in shards:
        assert list(tar_members(shard)) == [(m.name, m.offset_data, m.size) for m in members(shard)]
    names = {n for shard in shards for n, _, _ in tar_members(shard)}
    assert {"class0/a%2Eb%2Ec.jpg", "class1/été.jpg", f"class2/{'x' * 110}.jpg"} <= names
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shards[0].read_bytes()[:-1024 - 700])
    with pytest.raises(ValueError):
        list(tar_members(cut))
