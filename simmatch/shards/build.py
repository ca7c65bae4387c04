"""Pack an ImageNet-style tree into tar shards and their indexes (tools/make_shards.py).

The packing is a pure function of the tree and the shard size: images in the tree's sorted
order, a new shard whenever the next image would pass the size, tar headers with fixed
metadata (mtime 0, root, mode 0444). So a build that was killed and started again, or run
with another number of jobs, writes the same bytes.

Each shard is written under a hidden `.NNNNNN.tar.partial` name, fsynced, its record (bytes,
sha256, and each image's offset, size and CRC-32) saved in `OUT/.build/`, and only then renamed
to `NNNNNN.tar`: a shard under its final name is always whole. A new start skips the shards
whose record and size match, removes partial files, and rewrites the rest. When every shard is
there, each is read back and its sha256 compared with the one computed while writing; then
the indexes are written (atomically, each after its digest sidecar) and `OUT/.build/` removed.

Before anything is planned every image is decoded (`check`, threads as tools/check_data.py): an
image that does not decode stops the build before a shard is written, or, with `skip_bad`, is
left out, listed in `OUT/skipped.txt` and in its index's header, and part of the plan's
fingerprint (so a restart packs the same images). The result is kept in `OUT/.build/`: a restart
on an unchanged tree (names, sizes, mtimes) does not decode again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from simmatch.errors import DataError, UserError
from simmatch.files.atomic import atomic_write_text, file_sha256, fsync_dir
from simmatch.images.decode import Progress, decode_all
from simmatch.images.tree import ImageTree, scan_tree
from simmatch.shards.index import (
    SPLITS,
    VERSION,
    ShardInfo,
    header_of,
    index_path,
    index_text,
    index_version,
    member_ext,
    member_keys,
    write_index,
)
from simmatch.shards.verify import ByteProgress

BUILD_DIR = ".build"
DECODED = "decoded.json"  # in BUILD_DIR: the decode pass's result and the listing it was made on
SKIPPED = "skipped.txt"  # split <TAB> path relative to the split <TAB> why it was left out
SHOWN = 3  # bad images named in the error line
END_OF_ARCHIVE = b"\0" * 1024
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'1GB' (10^9), '512MiB' (2^29), '64k', '1000000' -> bytes."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not found or found.group(2).lower() not in UNITS:
        raise UserError(f"--shard-size {text!r}: expected a size such as 1GB, 512MiB or 64KB")
    value = int(float(found.group(1)) * UNITS[found.group(2).lower()])
    if value < 1000:
        raise UserError(f"--shard-size {text!r}: at least 1KB")
    return value


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padded(n: int) -> int:
    return -(-n // 512) * 512


def _members(key: str, rel: str, size: int, label: int) -> tuple[bytes, bytes, bytes]:
    """(image header, class header, class payload) of one image."""
    cls = str(label).encode()
    return _header(f"{key}.{member_ext(rel)}", size), _header(f"{key}.cls", len(cls)), cls


@dataclass
class ShardPlan:
    split: str
    number: int
    rows: list[int]  # lines of the split's image list
    bytes: int

    @property
    def name(self) -> str:
        return f"{self.split}/{self.number:06d}.tar"


def plan_split(split: str, tree: ImageTree, sizes: list[int], keys: list[str], shard_size: int) -> list[ShardPlan]:
    shards: list[ShardPlan] = []
    rows: list[int] = []
    used = 0
    for i, (rel, size, label, key) in enumerate(zip(tree.files, sizes, tree.labels, keys)):
        head, cls_head, cls = _members(key, rel, size, label)
        need = len(head) + _padded(size) + len(cls_head) + _padded(len(cls))
        if rows and used + need + len(END_OF_ARCHIVE) > shard_size:
            shards.append(ShardPlan(split, len(shards), rows, used + len(END_OF_ARCHIVE)))
            rows, used = [], 0
        rows.append(i)
        used += need
    if rows:
        shards.append(ShardPlan(split, len(shards), rows, used + len(END_OF_ARCHIVE)))
    return shards


def write_shard(out: Path, plan: ShardPlan, tree: ImageTree, sizes: list[int], keys: list[str]) -> dict:
    """Write one shard (partial name, fsync, record, rename); return its record."""
    final = out / plan.name
    partial = final.with_name(f".{final.name}.partial")
    sha, offset, rows = hashlib.sha256(), 0, []
    with open(partial, "wb") as f:
        def put(data: bytes) -> None:
            nonlocal offset
            f.write(data)
            sha.update(data)
            offset += len(data)

        for i in plan.rows:
            rel, size, label = tree.files[i], sizes[i], tree.labels[i]
            data = (tree.root / rel).read_bytes()
            if len(data) != size:
                raise DataError(f"{tree.root / rel} changed while being packed ({size} bytes, now {len(data)})")
            head, cls_head, cls = _members(keys[i], rel, size, label)
            put(head)
            rows.append([offset, size, zlib.crc32(data)])
            put(data + b"\0" * (_padded(size) - size))
            put(cls_head)
            put(cls + b"\0" * (_padded(len(cls)) - len(cls)))
        put(END_OF_ARCHIVE)
        f.flush()
        os.fsync(f.fileno())
    if offset != plan.bytes:
        raise DataError(f"{final}: wrote {offset} bytes, planned {plan.bytes}")
    record = {"name": plan.name, "bytes": offset, "images": len(plan.rows), "sha256": sha.hexdigest(),
              "rows": rows}
    atomic_write_text(record_path(out, plan), json.dumps(record))
    os.replace(partial, final)
    fsync_dir(final.parent)
    return record


def record_path(out: Path, plan: ShardPlan) -> Path:
    return out / BUILD_DIR / f"{plan.split}-{plan.number:06d}.json"


def done_record(out: Path, plan: ShardPlan) -> dict | None:
    """The record of a shard finished by an earlier start, if its file is there and whole."""
    try:
        record = json.loads(record_path(out, plan).read_text())
        if record["bytes"] == plan.bytes == os.stat(out / plan.name).st_size and record["images"] == len(plan.rows):
            return record
    except (OSError, ValueError, KeyError):
        pass
    return None


def _fingerprint(shard_size: int, plans: dict[str, list[ShardPlan]], trees: dict[str, ImageTree],
                 sizes: dict[str, list[int]], skipped: dict[str, list[tuple[str, str]]]) -> str:
    sha = hashlib.sha256(f"{VERSION}\n{shard_size}\n".encode())
    for split, bad in skipped.items():
        for rel, _ in bad:
            sha.update(f"skipped\t{split}\t{rel}\n".encode())
    for split, shards in plans.items():
        for p in shards:
            sha.update(f"{p.name}\n".encode())
            for i in p.rows:
                sha.update(f"{trees[split].files[i]}\t{sizes[split][i]}\t{trees[split].labels[i]}\n".encode())
    return sha.hexdigest()


_WORK: dict = {}  # what the forked workers read (the trees and sizes are not pickled for every shard)


def _write_planned(plan: ShardPlan) -> dict:
    return write_shard(_WORK["out"], plan, _WORK["trees"][plan.split], _WORK["sizes"][plan.split],
                       _WORK["keys"][plan.split])


class UndecodableImages(DataError):
    """Images of the tree that do not decode, found before anything was packed."""


def make_shards(src: str | Path, out: str | Path, shard_size: int, jobs: int = 1,
                show_progress: bool = True, log=print, check: bool = True, skip_bad: bool = False) -> dict:
    """Pack SRC/train and SRC/val into OUT; returns a summary (images, shards, bytes, skipped per split).

    `check`: decode every image first (in `jobs` threads); one that does not decode stops the build
    (nothing is packed), or with `skip_bad` is left out and listed in OUT/skipped.txt."""
    src, out = Path(src), Path(out)
    if skip_bad and not check:
        raise UserError("--skip-bad leaves out the images that the decode pass finds: drop --no-check")
    if not (src / "train").is_dir():
        raise DataError(f"data directory not found: {src / 'train'}")
    present = [s for s in SPLITS if (src / s).is_dir()]
    if all(index_path(out, s).is_file() for s in present) and not (out / BUILD_DIR).exists():
        older = {index_version(index_path(out, s)) for s in present} - {VERSION, None}  # None: check_data says
        if older:
            raise DataError(f"{out} holds shards of another index format ({', '.join(map(str, older))}; this "
                            f"version writes {VERSION}): pack into a new folder, or remove {out} first")
        log(f"{out}: already packed (its indexes are there); tools/check_data.py {out} verifies it")
        return {"complete": True}
    trees = {s: scan_tree(src / s) for s in present}
    if "val" in trees and trees["val"].classes != trees["train"].classes:
        raise DataError(f"class folders of {src / 'val'} differ from those of {src / 'train'}")
    made = [d for d in (out, out / BUILD_DIR) if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_DIR).mkdir(exist_ok=True)
    lock = open(out / BUILD_DIR / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DataError(f"{out} is being packed by another make_shards.py (its {BUILD_DIR}/lock is held)") from None
    try:
        return _build(src, out, trees, shard_size, jobs, show_progress, log, check, skip_bad)
    except UndecodableImages:
        for folder in reversed(made):  # nothing was packed: leave no trace of this start
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
        raise
    finally:
        lock.close()


def _undecodable(out: Path, trees: dict[str, ImageTree], stats: dict[str, list[os.stat_result]], jobs: int,
                 show_progress: bool) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """(path, reason) per split of every image that does not decode (JPEGs at 1/8 scale: every byte
    of the entropy-coded data is still read, so truncated and corrupt files are caught). The result
    is kept in OUT/.build/decoded.json (`keep_decoded`, once the plan is accepted): a restart on the same
    listing (names, sizes, mtimes; returned too) reuses it instead of decoding again."""
    listing = hashlib.sha256()
    for split, tree in trees.items():
        for rel, st in zip(tree.files, stats[split]):
            listing.update(f"{split}\t{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    try:
        earlier = json.loads((out / BUILD_DIR / DECODED).read_text())
        if earlier["listing"] == listing.hexdigest():
            return {s: [(str(p), str(r)) for p, r in earlier["bad"][s]] for s in trees}, listing.hexdigest()
    except (OSError, ValueError, KeyError, TypeError):
        pass
    progress = Progress(sum(len(t) for t in trees.values())) if show_progress else None
    bad = {s: [(rel, " ".join(reason.split("\t"))) for rel, reason in
               decode_all(t.root, t.files, max(1, jobs), fast=True, progress=progress)]
           for s, t in trees.items()}
    return bad, listing.hexdigest()


def keep_decoded(out: Path, bad: dict[str, list[tuple[str, str]]], listing: str) -> None:
    atomic_write_text(out / BUILD_DIR / DECODED, json.dumps({"listing": listing, "bad": bad}))


def _refusal(src: Path, out: Path, bad: dict[str, list[tuple[str, str]]]) -> str:
    named = [(f"{src / split / rel}", reason) for split, found in bad.items() for rel, reason in found]
    shown = "; ".join(f"{path} ({reason})" for path, reason in named[:SHOWN])
    more = f" and {len(named) - SHOWN} more" if len(named) > SHOWN else ""
    return (f"{len(named)} images of {src} cannot be decoded, so nothing was packed: {shown}{more}; pack "
            f"without them with --skip-bad (they are then listed in {out / SKIPPED} and in the indexes), or "
            f"replace them (tools/check_data.py {src} lists every bad file)")


def _build(src: Path, out: Path, trees: dict[str, ImageTree], shard_size: int, jobs: int,
           show_progress: bool, log, check: bool, skip_bad: bool) -> dict:
    stats = {s: [os.stat(t.root / f) for f in t.files] for s, t in trees.items()}
    skipped: dict[str, list[tuple[str, str]]] = {s: [] for s in trees}
    if check:
        skipped, listing = _undecodable(out, trees, stats, jobs, show_progress)
        if any(skipped.values()) and not skip_bad:
            raise UndecodableImages(_refusal(src, out, skipped))
        for split, bad in skipped.items():
            if bad:
                left_out = {rel for rel, _ in bad}
                tree = trees[split]
                kept = [i for i, rel in enumerate(tree.files) if rel not in left_out]
                trees[split] = ImageTree(tree.root, tree.classes, [tree.files[i] for i in kept],
                                         [tree.labels[i] for i in kept])
                stats[split] = [stats[split][i] for i in kept]
        if any(skipped.values()):
            log(f"left out {sum(map(len, skipped.values()))} images that cannot be decoded (--skip-bad; listed in "
                f"{out / SKIPPED})")
    sizes = {s: [st.st_size for st in stats[s]] for s in trees}
    keys = {s: member_keys(t.files) for s, t in trees.items()}
    plans = {s: plan_split(s, t, sizes[s], keys[s], shard_size) for s, t in trees.items()}
    fingerprint = _fingerprint(shard_size, plans, trees, sizes, skipped)
    plan_file = out / BUILD_DIR / "plan.json"
    if plan_file.is_file():
        earlier = json.loads(plan_file.read_text())
        if earlier.get("fingerprint") != fingerprint:
            raise DataError(f"{out} holds an unfinished packing of another tree or shard size "
                            f"({earlier.get('src')}, --shard-size {earlier.get('shard_size')}, "
                            f"{earlier.get('skipped', 0)} undecodable images left out); "
                            f"finish it with those, or remove {out}")
    else:
        atomic_write_text(plan_file, json.dumps({"fingerprint": fingerprint, "src": str(src),
                                                 "shard_size": shard_size,
                                                 "skipped": sum(map(len, skipped.values()))}))
    if check:
        keep_decoded(out, skipped, listing)
    for split in trees:
        (out / split).mkdir(exist_ok=True)
        for leftover in (out / split).glob(".*.partial"):
            leftover.unlink()
    every = [p for s in trees for p in plans[s]]
    records = {p.name: done_record(out, p) for p in every}
    todo = [p for p in every if records[p.name] is None]
    total = sum(len(t) for t in trees.values())
    if len(todo) < len(every):
        log(f"resuming: {len(every) - len(todo)} of {len(every)} shards already written")
    progress = Progress(total, "packed") if show_progress else None
    if progress is not None:
        progress.step(sum(len(p.rows) for p in every if records[p.name] is not None))
    _WORK.update(out=out, trees=trees, sizes=sizes, keys=keys)
    try:
        if jobs > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
                for plan, record in zip(todo, pool.map(_write_planned, todo)):
                    records[plan.name] = record
                    if progress is not None:
                        progress.step(len(plan.rows))
        else:
            for plan in todo:
                records[plan.name] = _write_planned(plan)
                if progress is not None:
                    progress.step(len(plan.rows))
    finally:
        _WORK.clear()
    _verify(out, every, records, show_progress)
    if any(skipped.values()):
        atomic_write_text(out / SKIPPED, "".join(f"{split}\t{rel}\t{reason}\n"
                                                 for split, bad in skipped.items() for rel, reason in bad))
    summary = {}
    for split, tree in trees.items():
        shards = [ShardInfo(p.name, records[p.name]["bytes"], len(p.rows), records[p.name]["sha256"])
                  for p in plans[split]]
        rows = [(p.number, o, n, tree.labels[i], crc, tree.files[i])
                for p in plans[split] for i, (o, n, crc) in zip(p.rows, records[p.name]["rows"])]
        header = header_of(split, tree.classes, shards, len(rows), skipped[split])
        write_index(out, split, index_text(header, rows))
        summary[split] = {"images": len(rows), "shards": len(shards), "bytes": sum(s.bytes for s in shards),
                          "skipped": len(skipped[split])}
    for f in sorted((out / BUILD_DIR).iterdir()):
        f.unlink()
    (out / BUILD_DIR).rmdir()
    return summary


def _verify(out: Path, plans: list[ShardPlan], records: dict[str, dict], show_progress: bool) -> None:
    """Read every shard back: its size and sha256 must be those computed while writing it."""
    total = sum(p.bytes for p in plans)
    progress = ByteProgress(total, "verified") if show_progress else None
    for p in plans:
        path = out / p.name
        if os.stat(path).st_size != records[p.name]["bytes"]:
            raise DataError(f"{path}: its size changed after it was written; run make_shards.py again")
        if file_sha256(path, progress.step if progress else None) != records[p.name]["sha256"]:
            record_path(out, p).unlink()
            raise DataError(f"{path}: the bytes read back differ from those written (a failing disk or a "
                            f"second writer?); run make_shards.py again to rewrite it")
