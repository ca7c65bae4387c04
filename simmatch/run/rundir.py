"""A run directory's layout, in one place: every path in it, and its checkpoints listed one way.

RUN_DIR/
  config.yaml               the resolved config (saved once the run passed its checks)
  splits/labeled.txt        the label lists it trains on (a resume reads them back)
  splits/unlabeled.txt
  checkpoints/ckpt_<iteration, 9 digits>.pt (+ .sha256)   recovery checkpoints, the newest N
  checkpoints/last.pt       symlink to the newest; best.pt (+ .sha256) links to best_<iteration>.pt,
                            best.json: the best evaluation
  metrics.jsonl             train / eval / resume records
  submissions.jsonl         SLURM submissions, starts, requeues and ends
  log_rank<R>.txt, tensorboard/, wandb/, .lock

No torch here: the submitting machine, `tools/status.py` and the pre-flight use it too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from simmatch.errors import UserError
from simmatch.files.atomic import DIGEST_SUFFIX, TMP_GLOB, atomic_write_text

CHECKPOINT_GLOB = "ckpt_*.pt"
CHECKPOINT_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
LAST, BEST, BEST_RECORD = "last.pt", "best.pt", "best.json"  # stable names beside the ckpt_*.pt
BEST_GLOB = "best_*.pt"  # the file best.pt links to: best_<iteration>.pt
SPLIT_NAMES = ("labeled", "unlabeled")


def split_list(folder: str | Path, name: str) -> Path:
    """A run's split list in its splits/ folder: labeled.txt or unlabeled.txt."""
    return Path(folder) / f"{name}.txt"


def read_run_list(path: str | Path) -> list[str]:
    """A run's own list (splits/*.txt), exactly as written: one path per line, split on "\n" only.
    Every name a tree can hold (spaces at either end, backslashes, form feeds, U+2028) comes back
    unchanged; only names with a line break or that are not UTF-8 cannot be listed, and those
    are refused when the tree is scanned."""
    text = Path(path).read_bytes().decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def run_list_text(paths: list[str]) -> str:
    """The text of a run's list of `paths` (read back by `read_run_list`)."""
    return "".join(p + "\n" for p in paths)


def checkpoint_name(iteration: int) -> str:
    """Zero-padded, so that names sort as iterations do."""
    return f"ckpt_{iteration:09d}.pt"


def checkpoint_iteration(name: str) -> int | None:
    """The iteration of a recovery checkpoint's file name; None for any other name."""
    m = CHECKPOINT_NAME.match(name)
    return int(m.group(1)) if m else None


def list_best(ckpt_dir: str | Path) -> list[Path]:
    """The best_<iteration>.pt files of `ckpt_dir` (best.pt links to the newest one)."""
    return sorted(Path(ckpt_dir).glob(BEST_GLOB))


def free_best_name(ckpt_dir: str | Path, iteration: int) -> str:
    """A name for the best checkpoint of `iteration` that no file has: best_<iteration>.pt, or with
    a count after it when that name is taken (a file is never rewritten in place)."""
    name, n = f"best_{iteration:09d}.pt", 1
    while (Path(ckpt_dir) / name).exists():
        name, n = f"best_{iteration:09d}_{n}.pt", n + 1
    return name


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every finished recovery checkpoint in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(it, p) for p in ckpt_dir.iterdir() if (it := checkpoint_iteration(p.name)) is not None]
    return sorted(found)


class RunDir:
    """The paths of one run directory (nothing is created by building it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split(self, name: str) -> Path:
        """splits/labeled.txt or splits/unlabeled.txt."""
        return split_list(self.splits, name)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, iteration: int) -> Path:
        return self.checkpoints / checkpoint_name(iteration)

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def best_record(self) -> Path:
        return self.checkpoints / BEST_RECORD

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def submissions(self) -> Path:
        return self.root / "submissions.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def log(self, rank: int) -> Path:
        return self.root / f"log_rank{rank}.txt"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.checkpoints)

    def newest_checkpoint(self) -> tuple[int, Path] | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def has_checkpoints(self) -> bool:
        """A run that has saved a checkpoint: it resumes, on the split it started with."""
        return bool(self.list_checkpoints())

    def holds_run(self) -> bool:
        """Something of a run is here already (a saved config or a checkpoint folder)."""
        return self.config.exists() or self.checkpoints.exists()

    def saved_config(self) -> dict | None:
        """config.yaml as a dict, with keys added to the project since it was written set to their
        defaults (so it compares key by key with a config of today); None without one. A file that
        is not a YAML mapping (damaged, emptied, binary) is a ConfigError naming it: it is never
        mistaken for the defaults."""
        if not self.config.exists():
            return None
        return read_run_config(self.config)

    def earlier_keys(self) -> list[str]:
        """The method keys config.yaml names as an earlier version did (flat: `method.<key>`), each as
        `old -> new` (config.upgrade_saved); [] for a config of today or none."""
        import yaml
        from simmatch.config import upgrade_saved

        try:
            data = yaml.safe_load(self.config.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return []
        return upgrade_saved(data)[1] if isinstance(data, dict) else []

    def save_config(self, cfg) -> None:
        """Write the fully resolved config (atomically) so that the run can be reproduced."""
        import yaml
        from simmatch.config import to_dict

        atomic_write_text(self.config, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def ensure_writable(self, create: bool = True) -> Path:
        return ensure_writable_dir(self.root, create=create)


def read_run_config(path: Path) -> dict:
    """A run's saved config file as a dict with today's defaults added; one ConfigError line naming
    the file when it cannot be (unreadable, not text, not YAML, empty, not a mapping)."""
    import yaml
    from simmatch.config import with_defaults
    from simmatch.errors import ConfigError

    what = f"{path} (the run's saved config)"
    try:
        text = path.read_bytes().decode("utf-8")
        data = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"{what} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not a text file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        raise ConfigError(f"{what} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} is a YAML {type(data).__name__}, not a mapping of config sections")
    return with_defaults(data)


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path("/")


def ensure_writable_dir(path: str | Path, key: str = "train.run_dir", create: bool = True) -> Path:
    """Create `path` (with parents) when `create`, then check that a file can be written there.

    A path that is a file, lies under a file, or sits in a read-only place is a `UserError`
    (one line naming the path and why), never a traceback from deep inside the trainer."""
    path = Path(path)
    where = f"{key}={path}"
    if path.exists() and not path.is_dir():
        raise UserError(f"{where} is a file, not a directory")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise UserError(f"{where} lies under {ancestor}, which is a file, not a directory")
    if not path.exists():
        if not create:
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise UserError(f"{where} cannot be created: {ancestor} is not writable")
            return path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{where} cannot be created in {ancestor}: "
                            f"{exc.strerror or type(exc).__name__}") from None
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{where} is not writable: {exc.strerror or type(exc).__name__}") from None
    return path


def run_dir_of(cfg) -> RunDir:
    """train.run_dir, else <train.output_root>/<config name>."""
    return RunDir(cfg.train.run_dir if cfg.train.run_dir else Path(cfg.train.output_root) / (cfg.name or "run"))


def remove_leftovers(*dirs: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporary files of a writer that died mid-write and checkpoint digests without
    their checkpoint; (path, size) of each. Call only while holding the run directory's lock, so
    that no live writer's file goes."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if d.is_dir():
            found += list(d.glob(TMP_GLOB))
            for pattern in (CHECKPOINT_GLOB, BEST_GLOB):
                found += [p for p in d.glob(pattern + DIGEST_SUFFIX) if not p.with_suffix("").exists()]
    removed = []
    for p in found:
        try:
            size = p.lstat().st_size  # a leftover may be a dangling symlink (.last.pt.*.tmp)
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append((p, size))
    return removed
