"""Loading a config: YAML files (with `base:` chains) and dotted overrides into the schema.

An unknown key or a value of the wrong type is a `ConfigError` naming the key and its source;
`validate` then checks choices, ranges (on the fields, config/schema.py) and relations between
keys. No torch here.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from simmatch.config.schema import COUNT, RANGES, Config, Range
from simmatch.errors import ConfigError
from simmatch.methods.spec import spec_of
from simmatch.shards.formats import data_format


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key} has unsupported type {_type_name(tp)}")


def _merge(obj: Any, updates: dict, source: str, prefix: str = "") -> None:
    """Write `updates` into the dataclass `obj` in place, rejecting unknown keys."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = prefix + str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"{source}: unknown config key '{full}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, source, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full, source))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The file's mapping, preceded by those of the files it names as `base`."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    layers: list[tuple[dict, str]] = []
    base = data.pop("base", None)
    if base:
        base_path = (path.parent / base).resolve()
        if base_path in seen:
            raise ConfigError(f"{path}: base '{base}' forms a cycle")
        layers += _read_yaml(base_path, seen + (path.resolve(),))
    layers.append((data, str(path)))
    return layers


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (and its bases), then each `key=value` override."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        for data, source in _read_yaml(path):
            _merge(cfg, data, source)
        if not cfg.name:
            cfg.name = path.stem
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply `key=value` overrides in place, then validate the whole config."""
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value), "command line")
    if cfg.data.num_classes == 0:
        cfg.data.num_classes = count_classes(cfg.data) or 1000
    validate(cfg)
    return cfg


def count_classes(data: Any) -> int:
    """The class folders of the training tree (as the data scan lists them), 0 without one."""
    return 0 if data.backend == "synthetic" else data_format(data).count_classes()


def choices(obj: Any, prefix: str = "") -> dict[str, tuple]:
    """Every `Literal[...]` field of the dataclass tree `obj`: dotted key -> allowed values."""
    out: dict[str, tuple] = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(choices(value, f"{prefix}{f.name}."))
        elif typing.get_origin(hints[f.name]) is Literal:
            out[prefix + f.name] = typing.get_args(hints[f.name])
    return out


def _check_range(key: str, value: Any, rng: Range) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item not in rng:
            shown = f"{key}={value}" if isinstance(value, list) else f"{key}={item!r}"
            what = "is not a finite number" if not math.isfinite(item) else "is out of range"
            raise ConfigError(f"{shown} {what}: valid range {rng}")


def validate(cfg: Config) -> None:
    """Reject values that type-check but cannot work: choices, ranges, relations between keys."""
    for key, allowed in choices(cfg).items():  # also catches values set in code, not loaded
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    if cfg.method.da_target != "uniform" and not spec_of(cfg.method.name).aligns:
        raise ConfigError(f"method.da_target={cfg.method.da_target} applies to methods that align the "
                          f"distribution (simmatch): {cfg.method.name} aligns none")
    for key, rng in RANGES.items():
        section, name = key.split(".")
        _check_range(key, getattr(getattr(cfg, section), name), rng)
    if cfg.data.backend == "dali" and cfg.data.num_threads < 1:
        raise ConfigError(f"data.num_threads={cfg.data.num_threads} is out of range for data.backend=dali: "
                          f"valid range {COUNT} (0, no worker processes, is for data.backend=torch)")
    if cfg.train.scale == "per_gpu" and cfg.train.batch_per_gpu <= 0:
        raise ConfigError("train.scale=per_gpu needs train.batch_per_gpu > 0")
    if cfg.data.backend != "synthetic":
        data_format(cfg.data).check_config()
    if 0 < cfg.data.val_resize < cfg.data.crop_size:
        raise ConfigError(f"data.val_resize={cfg.data.val_resize} is below data.crop_size={cfg.data.crop_size}: "
                          f"the validation images are resized so that the shorter side is val_resize pixels, "
                          f"then centre-cropped to crop_size (0: crop_size x 256 / 224)")
    if cfg.data.min_scale > cfg.data.max_scale:
        raise ConfigError(f"data.min_scale={cfg.data.min_scale} is above "
                          f"data.max_scale={cfg.data.max_scale}")
    if cfg.data.blur_sigma_min > cfg.data.blur_sigma_max:
        raise ConfigError(f"data.blur_sigma_min={cfg.data.blur_sigma_min} is above "
                          f"data.blur_sigma_max={cfg.data.blur_sigma_max}")
    _validate_multicrop(cfg)
    for key in ("data.mean", "data.std"):
        value = getattr(cfg.data, key.split(".")[1])
        if len(value) != 3:
            raise ConfigError(f"{key}={value} must have 3 values (R, G, B)")


def _validate_multicrop(cfg: Config) -> None:
    """One size and one scale range per strong view; other sizes only where views go apart."""
    d = cfg.data
    lists = {"data.strong_sizes": d.strong_sizes, "data.strong_min_scales": d.strong_min_scales,
             "data.strong_max_scales": d.strong_max_scales}
    if not any(lists.values()):
        return
    for key, value in lists.items():
        if len(value) != d.num_strong:
            raise ConfigError(f"{key} has {len(value)} entries, data.num_strong={d.num_strong}: "
                              f"give one per strong view (or set data.num_strong={len(value)})")
    for i, (lo, hi) in enumerate(zip(d.strong_min_scales, d.strong_max_scales)):
        if lo > hi:
            raise ConfigError(f"data.strong_min_scales[{i}]={lo} is above data.strong_max_scales[{i}]={hi}")
    if d.strong == "randaugment":
        raise ConfigError("data.strong_sizes (multi-crop) is for data.strong=simclr views; "
                          "data.strong=randaugment crops every view at data.crop_size")
    if any(size != d.crop_size for size in d.strong_sizes) and not spec_of(cfg.method.name).views_apart:
        raise ConfigError(f"data.strong_sizes={d.strong_sizes}: strong views of other sizes than "
                          f"data.crop_size={d.crop_size} need a method that forwards them apart "
                          f"(simmatchv2); {cfg.method.name} forwards its strong views in one batch")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "saved config") -> Config:
    cfg = Config()
    _merge(cfg, data, source)
    validate(cfg)
    return cfg




def with_defaults(saved: dict, defaults: dict | None = None) -> dict:
    """A saved config (a dict) with keys added to the project since it was written set to their
    defaults, so that it compares key by key with a config of today."""
    out = dict(to_dict(Config()) if defaults is None else defaults)
    for key, value in saved.items():
        out[key] = with_defaults(value, out[key]) if isinstance(value, dict) and \
            isinstance(out.get(key), dict) else value
    return out
