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
from simmatch.config.schema import COUNT, RANGES, Config, MethodConfig, Range
from simmatch.errors import ConfigError
from simmatch.methods.card import CARDS, card_of
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
    if isinstance(obj, MethodConfig):
        _merge_method(obj, updates, source)
        return
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    if isinstance(obj, Config):
        _note_sources(obj, updates, source)
    for key, value in updates.items():
        full = prefix + str(key)
        if isinstance(obj, Config) and key == "sources":
            continue
        if key not in names:
            near = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(f"{source}: unknown config key '{full}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, source, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full, source))


def _leaf_keys(updates: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in updates.items():
        if isinstance(value, dict) and key != "sources":
            out += _leaf_keys(value, f"{prefix}{key}.")
        elif key != "sources":
            out.append(f"{prefix}{key}")
    return out


def _note_sources(cfg: Config, updates: dict, source: str) -> None:
    """A layer's `sources` (each key a config key, each value a string), and "set in <layer>" for a
    key with a source that the layer sets again without giving one."""
    given = updates.get("sources", {})
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: sources must be a mapping of config keys to where their values come from")
    for key, text in given.items():
        if not isinstance(text, str):
            raise ConfigError(f"{source}: sources.{key} must be a string, got {text!r}")
        _value_of(cfg, str(key), f"{source}: sources.{key}")
    for key in _leaf_keys(updates):
        if key in cfg.sources and key not in given:
            cfg.sources[key] = source if source == "command line" else f"set in {source}"
    cfg.sources.update({str(k): v for k, v in given.items()})


def _value_of(cfg: Config, key: str, what: str) -> Any:
    """The value of the dotted `key` (method.<name>.<key> for a method's own), or one error line."""
    parts = key.split(".")
    obj: Any = cfg
    if parts[0] == "method" and len(parts) == 3 and parts[1] in CARDS:
        obj, parts = CARDS[parts[1]].defaults(), parts[2:]
    for part in parts:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"{what} names no config key ('{key}')")
        obj = getattr(obj, part)
    return obj


def _merge_method(m: MethodConfig, updates: dict, source: str) -> None:
    """`method.name` and the sections `method.<name>.*` of the methods' cards; a flat key of an
    earlier version is one line naming its key now."""
    for key, value in updates.items():
        if key == "name":
            m.name = _coerce(value, str, "method.name", source)
        elif key in CARDS:
            section = m.sections.get(key) or CARDS[key].defaults()
            _merge(section, value, source, f"method.{key}.")
            m.sections[key] = section
            first = next(iter(value), "") if isinstance(value, dict) else ""
            m.sources[key] = (source, f"method.{key}.{first}")
        else:
            raise ConfigError(f"{source}: {_method_key_hint(str(key), m.name)}")


def _method_key_hint(key: str, chosen: str) -> str:
    """Why `method.<key>` is not a key: renamed (each method's keys are its own now), or unknown."""
    owners = [(card.name, card.renamed[key]) for card in CARDS.values() if key in card.renamed]
    owners.sort(key=lambda owner: owner[0] != chosen)  # the chosen method's first
    if owners:
        now = " or ".join(f"method.{name}.{new}" for name, new in owners)
        return (f"method.{key} is a key of an earlier version: it is {now} now (each method's keys are "
                f"method.<name>.*; docs/RUNS.md lists them)")
    near = difflib.get_close_matches(key, ["name", *CARDS], n=1, cutoff=0.6)
    hint = f" (did you mean 'method.{near[0]}'?)" if near else ""
    return f"unknown config key 'method.{key}'{hint}; a method's keys are method.<name>.*, method.name one of " \
           f"{', '.join(sorted(CARDS))}"


def _settle_method(cfg: Config) -> None:
    """Keep only the chosen method's section: another method's sections from files are kept there
    for that method (a file may set several), but a key of another method given on the command
    line is refused."""
    m = cfg.method
    if m.name not in CARDS:
        raise ConfigError(f"method.name={m.name!r} is not one of {', '.join(sorted(CARDS))}")
    for other, (source, key) in m.sources.items():
        if other != m.name and source == "command line":
            raise ConfigError(f"{source}: {key} is a key of method {other}, but method.name={m.name}")
    m.sections = {m.name: m.params}
    m.sources = {k: v for k, v in m.sources.items() if k == m.name}


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


MethodLayers = dict[str, list[tuple[dict, str]]]  # method name -> its `with_method` blocks, in file order


def _take_method_layers(data: dict, source: str, into: MethodLayers) -> None:
    """A file's `with_method: {<method>: {<section>: {...}}}`: the values a recipe takes when that
    method is chosen (ReMixMatch's optimizer and views in the Table 1 recipe, say). Set aside, each
    block checked now against a scratch config (an unknown key or method fails here)."""
    blocks = data.pop("with_method", None)
    if blocks is None:
        return
    if not isinstance(blocks, dict):
        raise ConfigError(f"{source}: with_method must be a mapping of method names to config blocks")
    for name, block in blocks.items():
        if name not in CARDS:
            raise ConfigError(f"{source}: with_method.{name}: no method is called {name!r} "
                              f"(known: {', '.join(sorted(CARDS))})")
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: with_method.{name} must be a mapping of config keys")
        if "method" in block and "name" in (block["method"] or {}):
            raise ConfigError(f"{source}: with_method.{name} sets method.name: it applies once the method is chosen")
        label = f"{source} (with_method.{name})"
        _merge(Config(), block, label)
        into.setdefault(str(name), []).append((block, label))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (and its bases), then the files' `with_method` blocks of the
    chosen method (the command line's method.name if it gives one), then each `key=value` override."""
    cfg = Config()
    layers: MethodLayers = {}
    if path is not None:
        path = Path(path)
        for data, source in _read_yaml(path):
            data = dict(data)
            _take_method_layers(data, source, layers)
            _merge(cfg, data, source)
        if not cfg.name:
            cfg.name = path.stem
    return apply_overrides(cfg, overrides, layers)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...],
                    method_layers: MethodLayers | None = None) -> Config:
    """Apply the chosen method's `with_method` blocks, then the `key=value` overrides, in place;
    then validate the whole config."""
    parsed = [parse_override(text) for text in overrides]
    if method_layers:
        chosen = next((v for k, v in reversed(parsed) if k == "method.name"), cfg.method.name)
        for block, label in method_layers.get(str(chosen), []):
            _merge(cfg, block, label)
    for key, value in parsed:
        _merge(cfg, _nest(key, value), "command line")
    _settle_method(cfg)
    if cfg.data.num_classes == 0:
        cfg.data.num_classes = count_classes(cfg.data) or 1000
    validate(cfg)
    return cfg


def count_classes(data: Any) -> int:
    """The class folders of the training tree (as the data scan lists them), 0 without one."""
    return 0 if data.backend == "synthetic" else data_format(data).count_classes()


def choices(obj: Any, prefix: str = "") -> dict[str, tuple]:
    """Every `Literal[...]` field of the dataclass tree `obj`: dotted key -> allowed values; the
    method's section as `method.<name>.<key>`."""
    out: dict[str, tuple] = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(choices(value, f"{prefix}{f.name}."))
        elif typing.get_origin(hints[f.name]) is Literal:
            out[prefix + f.name] = typing.get_args(hints[f.name])
    if isinstance(obj, MethodConfig):
        out.update(choices(obj.params, f"{prefix}{obj.name}."))
    return out


def _value(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = obj.params if isinstance(obj, MethodConfig) and part == cfg.method.name else getattr(obj, part)
    return obj


def method_ranges(cfg: Config) -> dict[str, Range]:
    """The valid range of every numeric key of the chosen method's section: `method.<name>.<key>`."""
    return {f"method.{cfg.method.name}.{f.name}": f.metadata["range"]
            for f in dataclasses.fields(cfg.method.params) if "range" in f.metadata}


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
        value = _value(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    for key, rng in {**RANGES, **method_ranges(cfg)}.items():
        _check_range(key, _value(cfg, key), rng)
    card = card_of(cfg.method.name)
    if card.validate is not None:
        card.validate(cfg, cfg.method.params)
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
    _validate_views(cfg)
    if cfg.model.arch.startswith("wrn_") and cfg.model.small_input:
        raise ConfigError(f"model.small_input=true is for ResNets: {cfg.model.arch} is a 32-px network already "
                          f"(a 3x3 stride-1 stem, no max-pool); leave model.small_input=false")
    for key in ("data.mean", "data.std"):
        value = getattr(cfg.data, key.split(".")[1])
        if len(value) != 3:
            raise ConfigError(f"{key}={value} must have 3 values (R, G, B)")


def _validate_views(cfg: Config) -> None:
    """The small-image views (augment=translate) go with FixMatch's RandAugment, and only with it."""
    d = cfg.data
    if (d.augment == "translate") != (d.strong == "fixmatch_ra"):
        raise ConfigError(f"data.augment={d.augment} with data.strong={d.strong}: FixMatch's RandAugment "
                          f"(data.strong=fixmatch_ra) goes with the translated views (data.augment=translate), "
                          f"and they with it")
    if d.augment == "translate" and d.strong_sizes:
        raise ConfigError("data.strong_sizes (multi-crop) is for data.augment=crop: the translated views "
                          "keep the image's own size")


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
    if any(size != d.crop_size for size in d.strong_sizes) and not card_of(cfg.method.name).views_apart:
        raise ConfigError(f"data.strong_sizes={d.strong_sizes}: strong views of other sizes than "
                          f"data.crop_size={d.crop_size} need a method that forwards them apart "
                          f"(its card's views_apart); {cfg.method.name} forwards its strong views in one batch")


def to_dict(cfg: Config) -> dict:
    """The config as plain values, its method section as `method: {name: N, N: {...}}` (what
    RUN_DIR/config.yaml and the checkpoints hold)."""
    out = dataclasses.asdict(dataclasses.replace(cfg, method=MethodConfig(cfg.method.name)))
    out["method"] = {"name": cfg.method.name, cfg.method.name: dataclasses.asdict(cfg.method.params)}
    return out


def from_dict(data: dict, source: str = "saved config") -> Config:
    """A saved config (RUN_DIR/config.yaml, a checkpoint's) as a Config, also one written with an
    earlier version's flat method keys (`upgrade_saved`)."""
    cfg = Config()
    _merge(cfg, upgrade_saved(data)[0], source)
    _settle_method(cfg)
    validate(cfg)
    return cfg


def upgrade_saved(saved: dict) -> tuple[dict, list[str]]:
    """A saved config whose method keys are flat, as an earlier version wrote them (`method.<key>`),
    with them in the method's section (`method.<name>.<key now>`; each card names its earlier keys);
    the mapped keys as `old -> new`. Flat keys of other methods than the run's are dropped."""
    method = saved.get("method")
    if not isinstance(method, dict) or method.get("name") not in CARDS:
        return saved, []
    card = CARDS[method["name"]]
    flat = {k: v for k, v in method.items() if k != "name" and k not in CARDS}
    if not flat:
        return saved, []
    section = dict(method.get(card.name) or {})
    mapped = []
    for old, new in card.renamed.items():
        if old in flat:
            section[new] = flat[old]
            mapped.append(f"method.{old} -> method.{card.name}.{new}")
    return {**saved, "method": {"name": card.name, card.name: section}}, mapped


def with_defaults(saved: dict, defaults: dict | None = None) -> dict:
    """A saved config (a dict) with keys added to the project since it was written set to their
    defaults, so that it compares key by key with a config of today (flat method keys of an earlier
    version read in their section, `upgrade_saved`)."""
    if defaults is None:
        saved = upgrade_saved(saved)[0]
        defaults = to_dict(Config())
        name = (saved.get("method") or {}).get("name") if isinstance(saved.get("method"), dict) else None
        if name in CARDS:
            defaults["method"] = {"name": name, name: dataclasses.asdict(CARDS[name].defaults())}
    out = dict(defaults)
    for key, value in saved.items():
        out[key] = with_defaults(value, out[key]) if isinstance(value, dict) and \
            isinstance(out.get(key), dict) else value
    return out
