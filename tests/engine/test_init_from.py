"""model.init_from reads other people's weight files: each layout is built from a real tiny
torchvision ResNet, loaded into a fresh trunk, and the trunk must then equal the source."""
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from conftest import call_tool, final_state, save_unchecked, tiny_overrides
from simmatch.errors import CheckpointError
from simmatch.models.network import build_backbone
from simmatch.weights.init import init_backbone


def source_resnet(num_classes: int, seed: int = 1) -> torchvision.models.ResNet:
    """resnet10 with the small-input stem, random weights and BN statistics."""
    torch.manual_seed(seed)
    net = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    for name, buf in net.named_buffers():
        if "running" in name:
            buf.uniform_(0.5, 1.5)
    return net


def trunk(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def assert_trunk_equal(net, src_sd):
    got = net.state_dict()
    for k, v in trunk(src_sd).items():
        assert torch.equal(got[k], v), k


def layouts(tmp_path):
    """(file, source state_dict, expected unexpected count) for each common layout."""
    ten, thousand = source_resnet(10).state_dict(), source_resnet(1000, seed=2).state_dict()
    other = source_resnet(10, seed=3).state_dict()
    out = []
    # torchvision's published weight files: a plain state_dict saved with torch.save (1000 classes)
    torch.save(thousand, tmp_path / "resnet10-1a2b3c4d.pth")
    out.append(("resnet10-1a2b3c4d.pth", thousand, 0))
    # MoCo / ISD: {'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', 'module.queue'}, 'epoch', ...}
    moco = {f"module.encoder_q.{k}": v for k, v in ten.items() if not k.startswith("fc.")}
    moco.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512),
                 "module.encoder_q.fc.2.weight": torch.randn(128, 512)})
    moco.update({f"module.encoder_k.{k}": v for k, v in other.items()})
    moco["module.queue"] = torch.randn(128, 64)
    torch.save({"epoch": 200, "arch": "resnet10", "state_dict": moco, "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "moco_checkpoint_0199.pth.tar")
    out.append(("moco_checkpoint_0199.pth.tar", ten, 2 + len(other) + 1))
    torch.save({"model": {f"backbone.{k}": v for k, v in ten.items()}}, tmp_path / "model_backbone.pt")
    out.append(("model_backbone.pt", ten, 0))
    torch.save({"state_dict": {f"module.{k}": v for k, v in ten.items()}}, tmp_path / "ddp.ckpt")
    out.append(("ddp.ckpt", ten, 0))
    torch.save({f"encoder.{k}": v for k, v in ten.items()}, tmp_path / "encoder.bin")
    out.append(("encoder.bin", ten, 0))
    save_file({k: v.contiguous() for k, v in ten.items()}, str(tmp_path / "w.safetensors"))
    out.append(("w.safetensors", ten, 0))
    return out


def test_common_layouts_map_onto_the_trunk(tmp_path):
    for name, src, n_unexpected in layouts(tmp_path):
        net = build_backbone("resnet10", 10, small_input=True)
        fc_before = net.fc.weight.clone()
        report = init_backbone(net, tmp_path / name, "resnet10")
        assert_trunk_equal(net, src)
        if name.startswith("moco"):  # MoCo's fc is an MLP head: not a classifier, reported as unexpected
            assert torch.equal(net.fc.weight, fc_before) and "module.encoder_q.fc.0.weight" in report.unexpected
        elif src["fc.weight"].shape[0] == 10:
            assert torch.equal(net.fc.weight, src["fc.weight"]), name
        else:  # another class count: classifier kept as initialised, and said so
            assert torch.equal(net.fc.weight, fc_before)
            assert any("classifier skipped: it has 1000 classes" in n for n in report.notes)
        assert len(report.unexpected) == n_unexpected, (name, report.unexpected[:5])
        assert report.missing == [] and len(report.loaded) >= len(trunk(src))
        assert "loaded" in report.lines()[0] and "missing 0" in report.lines()[1]


def test_a_chosen_checkpoint_of_a_run(tmp_path):
    """`RUN/checkpoints/ckpt_1.pt` is the checkpoint of iteration 1, not the newest."""
    from simmatch.config import load_config, to_dict

    cfg = to_dict(load_config(None, ["data.num_classes=10", "model.arch=resnet10", "model.small_input=true"]))
    sds = {}
    for it in (1, 2):
        sd = source_resnet(10, seed=10 + it).state_dict()
        sds[it] = sd
        save_unchecked({"iteration": it, "config": cfg,
                        "method": {f"student.backbone.{k}": v for k, v in sd.items()}},
                       tmp_path / "run" / "checkpoints" / f"ckpt_{it:09d}.pt")
    for source, it in ((tmp_path / "run", 2), (tmp_path / "run" / "checkpoints" / "ckpt_1.pt", 1)):
        net = build_backbone("resnet10", 10, small_input=True)
        init_backbone(net, source, "resnet10")
        assert_trunk_equal(net, sds[it])
    with pytest.raises(CheckpointError, match="no checkpoint of iteration 7 .* has 1, 2"):
        init_backbone(net, tmp_path / "run" / "checkpoints" / "ckpt_7.pt", "resnet10")


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_refusals(tmp_path):
    net = build_backbone("resnet10", 10, small_input=True)
    torch.save({"state_dict": {"text_encoder.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="nothing in it maps onto the resnet10 trunk"):
        init_backbone(net, tmp_path / "other.pth", "resnet10")
    with open(tmp_path / "evil.pth", "wb") as f:  # an arbitrary object is never unpickled
        pickle.dump({"conv1.weight": Payload()}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle it"):
        init_backbone(net, tmp_path / "evil.pth", "resnet10")
    torch.save(source_resnet(10).state_dict(), tmp_path / "r10.pth")  # into resnet18: another architecture
    with pytest.raises(CheckpointError, match="architecture mismatch"):
        init_backbone(build_backbone("resnet18", 10, small_input=True), tmp_path / "r10.pth", "resnet18")


@pytest.mark.slow
def test_moco_checkpoint_starts_a_run(digits_root, tmp_path):
    """Through the CLI: a MoCo-style .pth.tar initialises the run, the report is printed, and a
    file that maps nothing is one error line before the run directory exists."""
    src = layouts(tmp_path)[1]
    run_dir = tmp_path / "run"
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",  # in this process (conftest.call_tool)
                    *tiny_overrides(digits_root, run_dir, **{
                        "optim.iters": 1, "optim.lr": "1.0e-30", "data.val_batch": 512,
                        "model.init_from": str(tmp_path / src[0])}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"loaded {len(trunk(src[1]))} tensors" in res.stdout and "missing 0" in res.stdout
    assert f"unexpected (not used) {src[2]}: module.encoder_q.fc.0.weight" in res.stdout
    state = final_state(run_dir)["method"]
    for k, v in trunk(src[1]).items():
        if "running_" not in k and "num_batches" not in k:  # one step in train mode moves BN statistics
            assert torch.allclose(state[f"student.backbone.{k}"], v, rtol=0, atol=1e-20), k  # lr 1e-30

    torch.save({"state_dict": {"text_encoder.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                    *tiny_overrides(digits_root, tmp_path / "r2", **{"model.init_from": str(tmp_path / "other.pth")}))
    assert res.returncode == 2 and "nothing in it maps onto the resnet10 trunk" in res.stderr
    assert not (tmp_path / "r2").exists()
