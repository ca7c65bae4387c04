"""DALI streams on DALI's CPU backend: shapes, labels, sharding, determinism, resume, errors."""
from __future__ import annotations

import io

import pytest
import torch

pytest.importorskip("nvidia.dali")

from conftest_data import data_cfg, same_batches, streams_for, take
from simmatch.data.splits import load_splits
from simmatch.errors import DataError

CPU = torch.device("cpu")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def streams(digits_root):
    s = streams_for(data_cfg(digits_root, "data.num_strong=2"), 0, 1, CPU)
    yield s
    s.close()


@pytest.fixture(scope="module")
def first(streams):
    """The first 3 labeled and 2 unlabeled batches, drawn before any other test moves them."""
    return take(streams.labeled, 3), take(streams.unlabeled, 2)


def _in_range(x: torch.Tensor) -> bool:
    lo, hi = (0 - MEAN) / STD - 1e-4, (1 - MEAN) / STD + 1e-4
    return bool(((x >= lo) & (x <= hi)).all())


def test_shapes_dtypes_ranges(streams, first):
    lab, unl = first
    b = lab[0]
    assert b["x"].shape == (8, 3, 32, 32) and b["x"].dtype == torch.float32
    assert b["y"].dtype == torch.int64 and b["index"].dtype == torch.int64
    assert _in_range(b["x"]) and b["x"].std() > 0.1
    assert ((b["index"] >= 0) & (b["index"] < streams.num_labeled)).all()
    u = unl[0]
    assert u["weak"].shape == (16, 3, 32, 32) and len(u["strong"]) == 2
    assert all(s.shape == (16, 3, 32, 32) and _in_range(s) for s in u["strong"])
    assert streams.num_labeled == 40 and streams.bank_labels.dtype == torch.int64
    assert streams.num_unlabeled == 1402 and streams.num_classes == 10


def test_labels_follow_index(streams, first, digits_root):
    lab, unl = first
    for b in lab:
        assert torch.equal(streams.bank_labels[b["index"]], b["y"])
    truth = torch.tensor(load_splits(data_cfg(digits_root).data).unlabeled_labels)
    for u in unl:
        assert torch.equal(truth[u["index"]], u["y"])
    assert streams.split_texts["labeled"].count("\n") == 40


def test_strong_differs_from_weak(first):
    u = first[1][0]
    assert (u["weak"] - u["strong"][0]).abs().mean() > 0.1
    assert (u["strong"][0] - u["strong"][1]).abs().mean() > 0.1


def test_same_seed_same_output_other_seed_differs(digits_root, first):
    again = streams_for(data_cfg(digits_root, "data.num_strong=2"), 0, 1, CPU)
    assert same_batches(first[0], take(again.labeled, 3))
    assert same_batches(first[1][:1], take(again.unlabeled, 1))
    other = streams_for(data_cfg(digits_root, "data.num_strong=2", "train.seed=4"), 0, 1, CPU)
    assert not torch.equal(first[0][0]["x"], take(other.labeled, 1)[0]["x"])


def test_epochs_cover_labeled_set_in_new_orders(digits_root):
    s = streams_for(data_cfg(digits_root), 0, 1, CPU)
    per_epoch = s.labeled.batches_per_epoch
    assert per_epoch == 5
    epochs = [torch.cat([b["index"] for b in take(s.labeled, per_epoch)]) for _ in range(2)]
    assert all(sorted(e.tolist()) == list(range(40)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])
    assert s.labeled.epoch == 2


def test_two_ranks_disjoint_and_covering(digits_root):
    cfg = data_cfg(digits_root)
    ranks = [streams_for(cfg, r, 2, CPU) for r in range(2)]
    idx = [torch.cat([b["index"] for b in take(s.labeled, s.labeled.batches_per_epoch)])
           for s in ranks]
    assert all(len(i) == 20 for i in idx)
    assert not set(idx[0].tolist()) & set(idx[1].tolist())
    assert set(idx[0].tolist()) | set(idx[1].tolist()) == set(range(40))
    # augmentation seeds differ by rank even for the same file order position
    x = [take(s.unlabeled, 1)[0]["weak"] for s in ranks]
    assert x[0].shape == (8, 3, 32, 32) and not torch.equal(x[0], x[1])


def test_val_exact_on_one_and_two_ranks(digits_root, streams):
    one = list(streams.val())
    x1, y1 = torch.cat([b["x"] for b in one]), torch.cat([b["y"] for b in one])
    assert len(y1) == streams.num_val == 395
    assert torch.equal(y1, torch.tensor(load_splits(data_cfg(digits_root).data).val_labels))
    cfg = data_cfg(digits_root)
    two = [list(streams_for(cfg, r, 2, CPU).val()) for r in range(2)]
    x2 = torch.cat([b["x"] for part in two for b in part])
    y2 = torch.cat([b["y"] for part in two for b in part])
    assert torch.equal(y1, y2) and torch.equal(x1, x2)  # every image exactly once, same pixels


def test_resume_is_exact(digits_root, streams):
    take(streams.labeled, 2)
    take(streams.unlabeled, 1)
    buf = io.BytesIO()
    torch.save(streams.train[0].state_dict(), buf)
    expected_l, expected_u = take(streams.labeled, 3), take(streams.unlabeled, 2)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = streams_for(data_cfg(digits_root, "data.num_strong=2"), 0, 1, CPU)
    fresh.train[0].load_state_dict(state)
    assert same_batches(expected_l, take(fresh.labeled, 3))
    assert same_batches(expected_u, take(fresh.unlabeled, 2))
    streams.train[0].load_state_dict(state)  # also in place, on a live pipeline
    assert same_batches(expected_l, take(streams.labeled, 3))


def test_resume_across_segment_boundary(digits_root):
    s = streams_for(data_cfg(digits_root), 0, 1, CPU)
    seg = s.labeled._segment_batches
    take(s.labeled, seg - 1)
    state = s.train[0].state_dict()
    expected = take(s.labeled, 3)  # crosses into the next segment's pipeline
    s.train[0].load_state_dict(state)
    assert same_batches(expected, take(s.labeled, 3))
    # CPU batches are zero-copy views of DALI buffers: the last batch of a segment must
    # survive its pipeline being dropped (and a new one allocating) before it is returned.
    s.train[0].load_state_dict(state)
    last = next(s.labeled)["x"]
    kept = last.clone()
    take(s.labeled, 2)
    assert torch.equal(last, kept) and torch.equal(kept, expected[0]["x"])


def test_channels_last_same_values(digits_root, first):
    cl = streams_for(data_cfg(digits_root, "train.channels_last=true"), 0, 1, CPU)
    x = take(cl.labeled, 1)[0]["x"]
    b = next(cl.labeled)["x"]
    assert b.is_contiguous(memory_format=torch.channels_last) and b.shape == (8, 3, 32, 32)
    assert torch.equal(x, first[0][0]["x"])


def test_randaugment_strong_view(digits_root):
    s = streams_for(data_cfg(digits_root, "data.strong=randaugment"), 0, 1, CPU)
    u = next(s.unlabeled)
    assert u["strong"][0].shape == (16, 3, 32, 32) and _in_range(u["strong"][0])
    assert (u["weak"] - u["strong"][0]).abs().mean() > 0.1


def test_empty_jitter_ranges_are_constants(digits_root):
    """jitter=0, hue=0 and a fixed blur sigma are legal settings (DALI rejects empty ranges)."""
    cfg = data_cfg(digits_root, "data.jitter=0.0", "data.hue=0.0", "data.jitter_prob=1.0",
                   "data.gray_prob=0.0", "data.blur_prob=0.0", "data.min_scale=1.0",
                   "data.blur_sigma_min=1.0", "data.blur_sigma_max=1.0")
    u = next(streams_for(cfg, 0, 1, CPU).unlabeled)
    # full-image crops with an identity colour twist and no blur: strong equals weak up to flips
    weak, strong = u["weak"], u["strong"][0]
    same = [torch.allclose(w, s, atol=1e-4) or torch.allclose(w, s.flip(-1), atol=1e-4)
            for w, s in zip(weak, strong)]
    assert all(same)


def test_corrupt_image_names_the_file(corrupt_root):
    cfg = data_cfg(corrupt_root, "data.num_classes=2", "data.labeled_percent=100",
                   "data.labeled_per_class=0", "train.batch_size=4", "train.mu=1")
    s = streams_for(cfg, 0, 1, CPU)
    with pytest.raises(DataError, match=r"cannot decode image .*train/1/bad\.jpg"):
        for _ in range(2 * s.labeled.batches_per_epoch):
            next(s.labeled)


def test_missing_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "absent")):
        streams_for(data_cfg(tmp_path / "absent"), 0, 1, CPU)


@pytest.mark.parametrize("name", ["labeled", "unlabeled", "unlabeled_multicrop", "val"])
def test_gpu_graphs_define_without_cuda(name):
    """The GPU variants (mixed decode, GPU ops) are only built on a GPU; their graphs must at
    least define and serialize here, which checks operator placement and arguments."""
    from dali_pipelines.labeled import labeled_pipeline
    from dali_pipelines.unlabeled import unlabeled_pipeline
    from dali_pipelines.val import val_pipeline
    from simmatch.config import DataConfig

    definition, extra = {"labeled": (labeled_pipeline, {"indices": [0]}),
                         "unlabeled": (unlabeled_pipeline, {"indices": [0]}),
                         "unlabeled_multicrop": (unlabeled_pipeline, {"indices": [0]}),
                         "val": (val_pipeline, {"labels": [0], "resize_shorter": 37})}[name]
    cfg = DataConfig(crop_size=32, num_strong=2)
    if name == "unlabeled_multicrop":  # views of two sizes, with solarize
        cfg = DataConfig(crop_size=32, num_strong=2, strong_sizes=[32, 16], strong_min_scales=[0.14, 0.05],
                         strong_max_scales=[1.0, 0.429], saturation=0.2, solarize_prob=0.1)
    pipe = definition(batch_size=2, num_threads=1, device_id=None, seed=1,
                      cfg=cfg, file_root="/nonexistent",
                      files=["a.jpg"], device="gpu", layout="HWC", **extra)
    graph = pipe.serialize()
    assert len(graph) > 1000
    assert b"NumbaFunction" not in graph  # the GPU graphs jitter with DALI's operators (color.py)
