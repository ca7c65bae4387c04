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
the indexes are written (atomically) and `OUT/.build/` removed.
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

from simmatch.checkpoint.atomic import atomic_write_text, file_sha256, fsync_dir
from simmatch.data.checks import Progress
from simmatch.data.splits import ImageTree, scan_tree
from simmatch.errors import DataError, UserError
from simmatch.shards.index import SPLITS, ShardInfo, header_of, index_path, index_text, member_ext, member_key
from simmatch.shards.verify import ByteProgress

BUILD_DIR = ".build"
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


def _members(rel: str, size: int, label: int) -> tuple[bytes, bytes, bytes]:
    """(image header, class header, class payload) of one image."""
    key = member_key(rel)
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


def plan_split(split: str, tree: ImageTree, sizes: list[int], shard_size: int) -> list[ShardPlan]:
    shards: list[ShardPlan] = []
    rows: list[int] = []
    used = 0
    for i, (rel, size, label) in enumerate(zip(tree.files, sizes, tree.labels)):
        head, cls_head, cls = _members(rel, size, label)
        need = len(head) + _padded(size) + len(cls_head) + _padded(len(cls))
        if rows and used + need + len(END_OF_ARCHIVE) > shard_size:
            shards.append(ShardPlan(split, len(shards), rows, used + len(END_OF_ARCHIVE)))
            rows, used = [], 0
        rows.append(i)
        used += need
    if rows:
        shards.append(ShardPlan(split, len(shards), rows, used + len(END_OF_ARCHIVE)))
    return shards


def write_shard(out: Path, plan: ShardPlan, tree: ImageTree, sizes: list[int]) -> dict:
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
            head, cls_head, cls = _members(rel, size, label)
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
                 sizes: dict[str, list[int]]) -> str:
    sha = hashlib.sha256(f"{shard_size}\n".encode())
    for split, shards in plans.items():
        for p in shards:
            sha.update(f"{p.name}\n".encode())
            for i in p.rows:
                sha.update(f"{trees[split].files[i]}\t{sizes[split][i]}\t{trees[split].labels[i]}\n".encode())
    return sha.hexdigest()


_WORK: dict = {}  # what the forked workers read (the trees and sizes are not pickled for every shard)


def _write_planned(plan: ShardPlan) -> dict:
    return write_shard(_WORK["out"], plan, _WORK["trees"][plan.split], _WORK["sizes"][plan.split])


def make_shards(src: str | Path, out: str | Path, shard_size: int, jobs: int = 1,
                show_progress: bool = True, log=print) -> dict:
    """Pack SRC/train and SRC/val into OUT; returns a summary (images, shards, bytes per split)."""
    src, out = Path(src), Path(out)
    if not (src / "train").is_dir():
        raise DataError(f"data directory not found: {src / 'train'}")
    present = [s for s in SPLITS if (src / s).is_dir()]
    if all(index_path(out, s).is_file() for s in present) and not (out / BUILD_DIR).exists():
        log(f"{out}: already packed (its indexes are there); tools/check_data.py {out} verifies it")
        return {"complete": True}
    trees = {s: scan_tree(src / s) for s in present}
    if "val" in trees and trees["val"].classes != trees["train"].classes:
        raise DataError(f"class folders of {src / 'val'} differ from those of {src / 'train'}")
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_DIR).mkdir(exist_ok=True)
    lock = open(out / BUILD_DIR / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"{out} is being packed by another make_shards.py (its {BUILD_DIR}/lock is held)") from None
    try:
        return _build(src, out, trees, shard_size, jobs, show_progress, log)
    finally:
        lock.close()


def _build(src: Path, out: Path, trees: dict[str, ImageTree], shard_size: int, jobs: int,
           show_progress: bool, log) -> dict:
    sizes = {s: [os.stat(t.root / f).st_size for f in t.files] for s, t in trees.items()}
    plans = {s: plan_split(s, t, sizes[s], shard_size) for s, t in trees.items()}
    fingerprint = _fingerprint(shard_size, plans, trees, sizes)
    plan_file = out / BUILD_DIR / "plan.json"
    if plan_file.is_file():
        earlier = json.loads(plan_file.read_text())
        if earlier.get("fingerprint") != fingerprint:
            raise DataError(f"{out} holds an unfinished packing of another tree or shard size "
                            f"({earlier.get('src')}, --shard-size {earlier.get('shard_size')}); "
                            f"finish it with those, or remove {out}")
    else:
        atomic_write_text(plan_file, json.dumps({"fingerprint": fingerprint, "src": str(src),
                                                 "shard_size": shard_size}))
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
    _WORK.update(out=out, trees=trees, sizes=sizes)
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
    summary = {}
    for split, tree in trees.items():
        shards = [ShardInfo(p.name, records[p.name]["bytes"], len(p.rows), records[p.name]["sha256"])
                  for p in plans[split]]
        rows = [(p.number, o, n, tree.labels[i], crc, tree.files[i])
                for p in plans[split] for i, (o, n, crc) in zip(p.rows, records[p.name]["rows"])]
        atomic_write_text(index_path(out, split), index_text(header_of(split, tree.classes, shards, len(rows)), rows))
        summary[split] = {"images": len(rows), "shards": len(shards), "bytes": sum(s.bytes for s in shards)}
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
