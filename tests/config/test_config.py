import pytest

from simmatch.config import derive, load_config
from simmatch.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: 32\nmethod:\n  simmatch:\n    tau: 0.95\n")
    cfg = load_config(p, ["train.mu=7", "optim.lr=0.1", "data.mean=[0.5,0.5,0.5]", "method.simmatch.dist_align=false"])
    assert cfg.train.batch_size == 32 and cfg.method.params.tau == 0.95
    assert cfg.train.mu == 7 and cfg.optim.lr == 0.1 and cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.method.params.dist_align is False
    assert cfg.name == "c"
    assert cfg.optim.momentum == 0.9  # untouched default


def test_base_file(tmp_path):
    write(tmp_path, "train:\n  batch_size: 8\n  mu: 3\n", "base.yaml")
    p = write(tmp_path, "base: base.yaml\ntrain:\n  mu: 4\n")
    cfg = load_config(p)
    assert (cfg.train.batch_size, cfg.train.mu) == (8, 4)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  batchsize: 32\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*train\.batchsize"):
        load_config(p)
    with pytest.raises(ConfigError, match="command line.*optim.lrr"):
        load_config(None, ["optim.lrr=1"])


def test_wrong_type(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match="train.batch_size must be an integer"):
        load_config(p)
    with pytest.raises(ConfigError, match="method.simmatch.dist_align must be true or false"):
        load_config(None, ["method.simmatch.dist_align=3"])
    with pytest.raises(ConfigError, match="method.name"):
        load_config(None, ["method.name=mixmatch"])


def test_derive():
    cfg = load_config(None, ["train.batch_size=64", "train.mu=5", "optim.epochs=2", "optim.warmup_epochs=1",
                             "optim.lr=0.03", "optim.base_batch=32"])
    d = derive(cfg, world_size=8, num_labeled=100, num_unlabeled=1000)
    assert d.batch_per_rank == 8 and d.unlabeled_per_rank == 40
    assert d.lr == pytest.approx(0.06)
    assert d.steps_per_epoch == 4  # ceil(1000 / 320)
    assert d.total_iters == 8 and d.warmup_iters == 4 and d.num_labeled == 100
    with pytest.raises(ConfigError, match="does not divide by the world size 3"):
        derive(cfg, world_size=3, num_labeled=100, num_unlabeled=1000)


def test_every_numeric_field_has_a_range():
    import dataclasses
    import typing

    from simmatch.config import RANGES, Config

    numeric = []
    for section in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(section.default_factory if section.default_factory
                                        is not dataclasses.MISSING else None):
            continue
        hints = typing.get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            tp = hints[f.name]
            if tp in (int, float) or typing.get_args(tp) in ((int,), (float,)):
                numeric.append(f"{section.name}.{f.name}")
    assert numeric and sorted(numeric) == sorted(RANGES)
    load_config(None)  # every default lies in its range


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", r"optim.lr=0.0 is out of range: valid range \(0, inf\)"),
    ("optim.momentum=1", r"optim.momentum=1.0 is out of range: valid range \[0, 1\)"),
    ("method.simmatch.alpha=-0.5", r"method.simmatch.alpha=-0.5 is out of range: valid range \[0, 1\]"),
    ("model.ema_momentum=.nan", r"model.ema_momentum=nan is not a finite number"),
    ("data.std=[0.2,0,0.2]", r"data.std=\[0.2, 0.0, 0.2\] is out of range"),
    ("data.mean=[0.5,0.5]", r"data.mean=\[0.5, 0.5\] must have 3 values"),
    ("data.min_scale=0.9", r"data.min_scale=0.9 is above data.max_scale=0.5"),
])
def test_ranges(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.max_scale=0.5", override])
    load_config(None, ["optim.lr=0.000001", "optim.momentum=0", "method.simmatch.alpha=1",
                       "train.max_nonfinite_steps=0"])


def test_num_classes_is_counted_from_the_tree_when_not_given(digits_root, tmp_path):
    """data.num_classes 0 (the default): the class folders of data.root/train_dir; given, it wins
    (and the data scan refuses a tree that disagrees); no tree to count: ImageNet's 1000."""
    import shutil

    from simmatch.config import load_config

    assert load_config(None, [f"data.root={digits_root}"]).data.num_classes == 10
    three = tmp_path / "three"
    for cls in ("cat", "dog", "owl"):
        shutil.copytree(digits_root / "train" / "0", three / "train" / cls)
    (three / "train" / ".hidden").mkdir()
    assert load_config(None, [f"data.root={three}"]).data.num_classes == 3
    assert load_config(None, [f"data.root={three}", "data.num_classes=5"]).data.num_classes == 5
    assert load_config(None, [f"data.root={tmp_path / 'absent'}"]).data.num_classes == 1000
    assert load_config(None, ["data.backend=synthetic"]).data.num_classes == 1000
