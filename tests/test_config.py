import pytest

from simmatch.config import derive, load_config
from simmatch.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  batch_size: 32\nmethod:\n  tau: 0.95\n")
    cfg = load_config(p, ["train.mu=7", "optim.lr=0.1", "data.mean=[0.5,0.5,0.5]", "method.dist_align=false"])
    assert cfg.train.batch_size == 32 and cfg.method.tau == 0.95
    assert cfg.train.mu == 7 and cfg.optim.lr == 0.1 and cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.method.dist_align is False
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
    with pytest.raises(ConfigError, match="method.dist_align must be true or false"):
        load_config(None, ["method.dist_align=3"])
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
