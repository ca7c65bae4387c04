"""A sweep: one run directory per point of a grid and per seed, and DIR/sweep.json that lists them.

The paper's studies are grids (Figure 5: t x alpha; Table 5: the ablations), and a lab runs them
again when some points failed: a sweep is defined once, by its config, grid, seeds and common
overrides, and saved in DIR/sweep.json; each point's run directory is named from the point
(`DIR/<key>=<value>,.../s<seed>`), so that the same command, given again, finds which points are
finished and trains only the others. No torch here: tools/sweep.py submits without it.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from simmatch.errors import UserError
from simmatch.files.atomic import atomic_write_text
from simmatch.run.jsonl import read_records
from simmatch.run.results import finished_index
from simmatch.run.rundir import RunDir

SWEEP_FILE = "sweep.json"
CFG_KEY = "cfg"  # a grid over config files: `--grid cfg=yaml/digits.yaml,yaml/digits_v2.yaml`
SEED_KEY = "train.seed"
PLACEHOLDERS = ("{seed}", "{sweep}")  # in a common override: the point's seed, the sweep's directory


class SweepError(UserError):
    """A sweep that cannot be defined, or that differs from the one DIR already holds."""


def split_values(text: str) -> list[str]:
    """`0.05,0.1` -> ['0.05', '0.1']; commas inside [...] belong to a list value ([16,14],[8])."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    values.append(cur)
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`--grid key=v1,v2` options -> {key: [v1, v2]}, in the order given."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise SweepError(f"--grid {item!r} is not of the form key=v1,v2,...")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice")
        if key == SEED_KEY:
            raise SweepError(f"--grid {SEED_KEY}: the seeds are --seeds")
        values = split_values(raw)
        if any(v == "" for v in values) or len(set(values)) != len(values):
            raise SweepError(f"--grid {item!r}: empty or repeated value")
        grid[key] = values
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in split_values(text)]
    except ValueError:
        raise SweepError(f"--seeds {text!r} is not a comma-separated list of integers") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {text!r}: seeds are distinct integers >= 0")
    return seeds


def value_name(key: str, value: str) -> str:
    """A value as it appears in a directory name: a config file by its stem, '/' never."""
    if key == CFG_KEY:
        return Path(value).stem
    return quote(value, safe="=.-_+[]:@")


@dataclass
class Point:
    """One run of the sweep: the grid's values, the seed, the run directory relative to DIR."""

    params: dict[str, str]
    seed: int
    name: str  # DIR/<name>/s<seed> is its run directory; `name` is what the seeds of a point share

    @property
    def rel(self) -> str:
        return f"{self.name}/s{self.seed}"


@dataclass
class Sweep:
    """The definition saved in DIR/sweep.json; the same command given again must match it."""

    cfg: str
    grid: dict[str, list[str]]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    created: str = ""
    submissions: list[dict] = field(default_factory=list)

    def points(self) -> list[Point]:
        """Every point and seed, grid order (the first key varies slowest), seeds innermost."""
        keys = list(self.grid)
        out = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            params = dict(zip(keys, combo))
            name = ",".join(f"{k}={value_name(k, v)}" for k, v in params.items()) or "base"
            out.extend(Point(params, seed, name) for seed in self.seeds)
        return out

    def cfg_of(self, point: Point) -> str:
        return point.params.get(CFG_KEY, self.cfg)

    def train_overrides(self, point: Point, root: Path) -> list[str]:
        """The point's overrides: the common ones (placeholders filled), the grid's, the seed,
        the run directory."""
        def fill(text: str) -> str:
            return text.replace("{seed}", str(point.seed)).replace("{sweep}", str(root))

        grid = [f"{k}={v}" for k, v in point.params.items() if k != CFG_KEY]
        return [*(fill(o) for o in self.overrides), *grid, f"{SEED_KEY}={point.seed}",
                f"train.run_dir={root / point.rel}"]

    def definition(self) -> dict:
        return {"cfg": self.cfg, "grid": self.grid, "seeds": self.seeds, "overrides": self.overrides}


def validate(sweep: Sweep) -> None:
    """Refuse a sweep whose points would collide or override what the sweep decides itself."""
    if not sweep.cfg and CFG_KEY not in sweep.grid:
        raise SweepError("no config: give --cfg CONFIG or --grid cfg=A.yaml,B.yaml")
    for o in sweep.overrides:
        key = o.partition("=")[0].strip()
        if key in ("train.run_dir", SEED_KEY):
            raise SweepError(f"override {o!r}: the sweep sets {key} itself (--out, --seeds)")
        if key in sweep.grid:
            raise SweepError(f"override {o!r}: {key} is also a --grid key")
    names = [p.rel for p in sweep.points()]
    if len(set(names)) != len(names):
        raise SweepError("two points of the grid get the same directory name (two config files of one stem?)")
    for cfg in sweep.grid.get(CFG_KEY, [sweep.cfg]):
        if not Path(cfg).is_file():
            raise SweepError(f"config {cfg}: no such file")


def sweep_path(root: Path) -> Path:
    return Path(root) / SWEEP_FILE


def load_sweep(root: Path) -> Sweep | None:
    """DIR/sweep.json, or None where there is none; a damaged one is one error line."""
    path = sweep_path(root)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Sweep(cfg=data["cfg"], grid={k: [str(v) for v in vs] for k, vs in data["grid"].items()},
                     seeds=[int(s) for s in data["seeds"]], overrides=list(data.get("overrides", [])),
                     created=data.get("created", ""), submissions=list(data.get("submissions", [])))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SweepError(f"{path} is damaged ({type(exc).__name__}: {exc}); move it away to start a new sweep") \
            from None


def save_sweep(root: Path, sweep: Sweep) -> None:
    data = asdict(sweep)
    data["points"] = [{"name": p.name, "params": p.params, "seed": p.seed, "run_dir": p.rel}
                      for p in sweep.points()]
    Path(root).mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_path(root), json.dumps(data, indent=1) + "\n")


def open_sweep(root: Path, wanted: Sweep) -> Sweep:
    """The sweep of DIR: `wanted`, saved if DIR has none yet; the saved one if it is the same
    definition; else one error line naming the first difference."""
    saved = load_sweep(root)
    if saved is None:
        validate(wanted)
        wanted.created = wanted.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        save_sweep(root, wanted)
        return wanted
    old, new = saved.definition(), wanted.definition()
    for key in old:
        if old[key] != new[key]:
            raise SweepError(f"{sweep_path(root)} holds another sweep: its {key} is {old[key]!r}, this command's "
                             f"{new[key]!r} (give the same command, or another --out)")
    return saved


def run_finished(run_dir: Path) -> bool:
    """A run is finished when its metrics.jsonl's newest progress record is the trainer's
    `finished` record (written after the final evaluation)."""
    return finished_index(read_records(RunDir(run_dir).metrics)) is not None


def final_evaluation(run_dir: Path) -> dict:
    """The run's last `eval` record (its final evaluation once finished); {} without one."""
    evals = [r for r in read_records(RunDir(run_dir).metrics) if r.get("kind") == "eval"]
    return evals[-1] if evals else {}
