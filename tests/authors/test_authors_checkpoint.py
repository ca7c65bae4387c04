"""The SimMatch and SimMatchV2 authors' released checkpoints (simmatch-1p.pth, 300ep-res50-1p.pth ...)
read by tools/eval.py, tools/export.py and model.init_from.

Each file is written here as their training scripts write it (SimMatch simmatch.py, SimMatchV2 main.py:
`{'epoch', 'arch', 'state_dict': <DDP-wrapped model>.state_dict(), 'optimizer'[, 'best_acc1',
'best_acc5', 'scaler']}`), the model being the test-owned transcription of their module structure
(authors_simmatch.SimMatch, authors_simmatchv2.SimMatchV2: `main` and `ema`, each `backbone`, `fc`,
`head` and, in V2 with --norm_feat, `norm`), wrapped in nn.DataParallel for the `module.` prefix that
DDP gives their files. The trunk is the digits configs' resnet10 at 16 px (their backbone/resnet.py
is torchvision's layers, so any depth has their names). Every expected number comes from the
transcription's own forward.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from authors_simmatch import SimMatch, Trunk
from authors_simmatchv2 import RECIPE_1P, SimMatchV2

from conftest import assert_one_line_error, call_tool, run_tool
from conftest_data import streams_for
from simmatch.config import load_config
from simmatch.errors import CheckpointError, UserError
from simmatch.models.network import build_backbone
from simmatch.weights.init import check_init_source, init_backbone
from simmatch.weights.networks import load_run_checkpoint, network_state, training_network

ROOT = Path(__file__).resolve().parents[2]
CLASSES, DIM, LABELED = 10, 64, 40  # yaml/digits.yaml: 10 classes, model.proj_dim 64, 4 labels per class
CFG = {"SimMatch": ROOT / "yaml" / "digits.yaml", "SimMatchV2": ROOT / "yaml" / "digits_v2.yaml"}
THEIR_NAMES = {"SimMatch": {"main", "ema", "bank", "labels", "DA_queue", "DA_ptr"},  # models/simmatch.py
               "SimMatchV2": {"main", "ema", "l_bank", "l_labels", "ptr", "u_bank", "u_labels", "da"}}


def trunk() -> Trunk:
    return Trunk([1, 1, 1, 1], small_input=True)


def authors_model(layout: str, seed: int) -> torch.nn.Module:
    """Their model with every parameter and buffer moved off its initial value (`main` and `ema`
    apart; BN variances positive), so that a wrong name, network or part shows."""
    torch.manual_seed(seed)
    if layout == "SimMatch":
        model = SimMatch(trunk, CLASSES, DIM, LABELED)
    else:
        model = SimMatchV2(trunk, CLASSES, torch.arange(LABELED) % CLASSES, 8 * 64, {**RECIPE_1P, "dim": DIM})
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "running_var" in name:
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
    return model.eval()


def write_authors_file(layout: str, path: Path, seed: int) -> torch.nn.Module:
    """The file their training script saves."""
    model = authors_model(layout, seed)
    wrapped = torch.nn.DataParallel(model)  # the `module.` prefix of their DDP model
    optimizer = torch.optim.SGD(wrapped.parameters(), 0.03, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for p in wrapped.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()  # momentum buffers in the optimizer's state, as in a file saved after training
    state = {"epoch": 400 if layout == "SimMatch" else 300, "arch": layout,
             "state_dict": wrapped.state_dict(),
             "optimizer": optimizer.state_dict()}
    if layout == "SimMatchV2":
        state.update(best_acc1=71.9, best_acc5=89.9, scaler={"scale": 65536.0, "growth_factor": 2.0,
                     "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7})
    torch.save(state, path)
    return model


@pytest.fixture(scope="module")
def authors_files(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One file of each layout (written once for this module) and the model it holds."""
    out = {}
    for seed, layout in enumerate(("SimMatch", "SimMatchV2")):
        name = "simmatch-1p.pth" if layout == "SimMatch" else "300ep-res50-1p.pth"  # their README's names
        path = tmp_path_factory.mktemp("authors") / name
        out[layout] = path, write_authors_file(layout, path, seed)
    return out


@pytest.fixture(scope="module")
def tiny_root(digits_root, tmp_path_factory) -> Path:
    """Real JPEGs, few: the digits' first 4 training and 2 validation images of each class."""
    import shutil

    root = tmp_path_factory.mktemp("authors_tiny")
    for split, n in (("train", 4), ("val", 2)):
        for cls in sorted(p.name for p in (digits_root / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((digits_root / split / cls).iterdir())[:n]:
                shutil.copy(src, root / split / cls / src.name)
    return root


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["SimMatch", "SimMatchV2"])
def test_authors_checkpoint_networks_are_theirs(layout, authors_files):
    """Student = their `main`, teacher = their `ema`: the project's network built from the file gives
    their forward's logits and embeddings exactly; the two networks differ (the control)."""
    path, model = authors_files[layout]
    assert {k.split(".")[1] for k in torch.load(path, weights_only=True)["state_dict"]} == THEIR_NAMES[layout]
    file, state, cfg = load_run_checkpoint(path, cfg_path=CFG[layout])
    assert state["iteration"] is None and state["epoch"] == (400 if layout == "SimMatch" else 300)
    x = images()
    got = {}
    with torch.no_grad():
        for which, theirs in (("student", model.main), ("teacher", model.ema)):
            logits, emb = training_network(cfg, network_state(state, which, file)).eval()(x)
            want_logits, want_emb = theirs(x)
            assert torch.equal(logits, want_logits), which
            torch.testing.assert_close(emb, want_emb, rtol=0, atol=1e-6)
            got[which] = logits
    assert (got["student"] - got["teacher"]).abs().max() > 0.1


def their_accuracy(net: torch.nn.Module, batches: list[dict]) -> tuple[float, float]:
    """Top-1 / top-5 in percent as their engine.validate counts them, over the given batches."""
    hits1 = hits5 = n = 0
    with torch.no_grad():
        for b in batches:
            top = net(b["x"])[0].topk(5, dim=1).indices
            hits1 += int((top[:, 0] == b["y"]).sum())
            hits5 += int((top == b["y"][:, None]).any(1).sum())
            n += len(b["y"])
    return 100.0 * hits1 / n, 100.0 * hits5 / n


def test_authors_checkpoint_evaluates(authors_files, tiny_root):
    """tools/eval.py on a validation split of real JPEGs: each network's top-1 / top-5 are their
    forward's on the same preprocessed images (a SimMatchV2 file, the torch backend in this process;
    the slow test below reads a SimMatch file with the digits config's DALI pipelines)."""
    layout = "SimMatchV2"
    path, model = authors_files[layout]
    overrides = [f"data.root={tiny_root}", "data.backend=torch", "data.num_threads=0"]
    res = call_tool("tools/eval.py", str(path), "--cfg", str(CFG[layout]), "--device", "cpu",
                    *overrides)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    cfg = load_config(CFG[layout], overrides)
    streams = streams_for(cfg)
    batches = [{"x": b["x"].clone(), "y": b["y"].clone()} for b in streams.val()]
    streams.close()
    assert out["count"] == sum(len(b["y"]) for b in batches) == 20
    assert out["which"] == ["student", "teacher"] and out["epoch"] == (400 if layout == "SimMatch" else 300)
    for which, theirs in (("student", model.main), ("teacher", model.ema)):
        top1, top5 = their_accuracy(theirs, batches)
        assert (out[f"{which}_top1"], out[f"{which}_top5"]) == pytest.approx((top1, top5), abs=1e-9), which
    assert f"{layout} authors' checkpoint" in res.stdout


def test_authors_checkpoint_exports(authors_files, tmp_path, tiny_root):
    """The exported torchvision model (built here: resnet10's blocks, the small stem, V2's LayerNorm
    first in `fc`) gives their teacher's logits; the card says where the weights come from. (A
    SimMatch file's student: the slow test below.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from simmatch.weights.export import export

    layout, which = "SimMatchV2", "teacher"
    path, model = authors_files[layout]
    res = export(path, which, tmp_path / "out" / "resnet.pth", cfg_path=CFG[layout],
                 overrides=[f"data.root={tiny_root}"])
    assert res["max_abs_diff"] == 0.0 and len(res["written"]) == 2
    plain = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)
    plain.conv1, plain.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    plain.fc = torch.nn.Sequential(torch.nn.LayerNorm(512), plain.fc)
    theirs = model.ema
    x = images(seed=4)
    for weights in (torch.load(tmp_path / "out" / "resnet.pth", weights_only=True),
                    load_file(str(tmp_path / "out" / "resnet.safetensors"))):
        plain.load_state_dict(weights, strict=True)
        with torch.no_grad():
            assert torch.equal(plain.eval()(x), theirs(x)[0])
    with safe_open(str(tmp_path / "out" / "resnet.safetensors"), "pt") as f:
        card = f.metadata()
    assert card["which"] == which and card["epoch"] == "300" and card["fc"].startswith("Sequential(LayerNorm")
    assert "iteration" not in card and f"{layout} authors' checkpoint" in card["source"]
    assert card["classes"] == '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'


@pytest.mark.parametrize("layout", ["SimMatch", "SimMatchV2"])
def test_authors_checkpoint_initialises_a_run(layout, authors_files):
    """model.init_from: the trunk and classifier loaded are their student's (`main`) tensors, read
    from the file here; their teacher, head, LayerNorm and banks are reported as not used."""
    path, _ = authors_files[layout]
    saved = torch.load(path, weights_only=True)["state_dict"]
    check_init_source(load_config(CFG[layout], [f"model.init_from={path}"]))  # a fresh run's check
    net = build_backbone("resnet10", CLASSES, small_input=True)
    report = init_backbone(net, path, "resnet10")
    got = net.state_dict()
    theirs = {k[len("module.main.backbone."):]: v for k, v in saved.items() if k.startswith("module.main.backbone.")}
    theirs.update({f"fc.{p}": saved[f"module.main.fc.{p}"] for p in ("weight", "bias")})
    assert set(theirs) == set(got)
    for k, v in theirs.items():
        assert torch.equal(got[k], v), k
    assert len(report.loaded) == len(got) and not report.missing
    assert "module.ema.backbone.conv1.weight" in report.unexpected and "module.main.head.0.weight" in report.unexpected
    assert any(f"the {layout} authors' checkpoint" in n and "`main`" in n for n in report.notes)


def test_authors_checkpoint_refusals(authors_files, tmp_path):
    """One line each: a foreign layout names keys it did not expect; an authors' file without --cfg
    names what is missing; a file holding only their student refuses the teacher; a V2 file read
    with a config without the LayerNorm names the key to set; keys their model has not."""
    foreign = {"epoch": 3, "state_dict": {"module.encoder.stem.weight": torch.zeros(2),
                                          "module.classifier.weight": torch.zeros(2)}}
    torch.save(foreign, tmp_path / "foreign.pth")
    res = call_tool("tools/eval.py", str(tmp_path / "foreign.pth"), "--cfg", str(CFG["SimMatch"]))
    assert_one_line_error(res, "unexpected keys module.encoder.stem.weight, module.classifier.weight")
    res = call_tool("tools/export.py", str(tmp_path / "foreign.pth"), "--cfg", str(CFG["SimMatch"]),
                    "--out", str(tmp_path / "x.pth"))
    assert_one_line_error(res, "neither a checkpoint of this project nor the SimMatch / SimMatchV2 authors'")
    net = build_backbone("resnet10", CLASSES, small_input=True)
    with pytest.raises(CheckpointError, match="nothing in it maps onto the resnet10 trunk .*module.encoder.stem"):
        init_backbone(net, tmp_path / "foreign.pth", "resnet10")

    v1, v2 = authors_files["SimMatch"][0], authors_files["SimMatchV2"][0]
    res = call_tool("tools/eval.py", str(v1))
    assert_one_line_error(res, "the SimMatch authors' checkpoint", "holds no config: name one with --cfg")

    state = torch.load(v1, weights_only=True)
    main_only = {k: v for k, v in state["state_dict"].items() if not k.startswith("module.ema.")}
    torch.save({**state, "state_dict": main_only}, tmp_path / "main.pth")
    res = call_tool("tools/eval.py", str(tmp_path / "main.pth"), "--cfg", str(CFG["SimMatch"]), "--which", "teacher")
    assert_one_line_error(res, "holds only the SimMatch authors' student (`main`), not their teacher (`ema`): "
                               "use --which student")

    res = call_tool("tools/export.py", str(v2), "--cfg", str(CFG["SimMatch"]),
                    "--out", str(tmp_path / "v2" / "x.pth"))
    assert_one_line_error(res, "unexpected norm.weight", "set model.norm_feat=true")
    assert not (tmp_path / "v2").exists()

    state["state_dict"]["module.main.predictor.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="holds keys their model does not: unexpected keys "
                                              "main.predictor.weight"):
        load_run_checkpoint(tmp_path / "extra.pth", cfg_path=CFG["SimMatch"])
    torch.save({"method": {}, "config": {}, "iteration": 1}, tmp_path / "ours.pt")  # this project's: its own config
    with pytest.raises(UserError, match="--cfg is for the authors' checkpoints, which hold no config"):
        load_run_checkpoint(tmp_path / "ours.pt", cfg_path=CFG["SimMatch"])


@pytest.mark.slow
def test_authors_checkpoint_tools_on_the_command_line(tmp_path, digits_root):
    """The commands docs/RUNS.md gives, in their own processes, on a SimMatch file and the digits
    config's DALI pipelines: tools/eval.py's teacher top-1 / top-5 are their `ema`'s on the same
    images; tools/export.py's file gives their `main`'s logits."""
    model = write_authors_file("SimMatch", tmp_path / "simmatch-1p.pth", seed=7)
    overrides = [f"data.root={digits_root}", "data.num_threads=1"]
    res = run_tool("tools/eval.py", str(tmp_path / "simmatch-1p.pth"), "--cfg", str(CFG["SimMatch"]),
                   "--which", "teacher", "--device", "cpu", *overrides)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    streams = streams_for(load_config(CFG["SimMatch"], overrides))
    batches = [{"x": b["x"].clone(), "y": b["y"].clone()} for b in streams.val()]
    streams.close()
    assert out["count"] == sum(len(b["y"]) for b in batches) > 300
    assert (out["teacher_top1"], out["teacher_top5"]) == pytest.approx(their_accuracy(model.ema, batches), abs=1e-9)
    assert "student_top1" not in out
    res = run_tool("tools/export.py", str(tmp_path / "simmatch-1p.pth"), "--cfg", str(CFG["SimMatch"]),
                   "--which", "student", "--out", str(tmp_path / "export" / "resnet.pth"), *overrides)
    assert res.returncode == 0, res.stderr
    assert "exported student of " in res.stdout
    assert "SimMatch authors' checkpoint from mingkai-zheng/SimMatch, epoch 400" in res.stdout
    plain = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)
    plain.conv1, plain.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    plain.load_state_dict(torch.load(tmp_path / "export" / "resnet.pth", weights_only=True), strict=True)
    x = images(seed=8)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model.main(x)[0])


@pytest.mark.slow
def test_authors_checkpoint_starts_a_run(tmp_path, digits_root):
    """model.init_from on a SimMatchV2 file through tools/train.py (in this process): the run's student
    and teacher trunks and classifier are their `main`'s, read from the file here (lr 1e-30: one step
    moves only the BN statistics); the report names their file."""
    from conftest import final_state, tiny_overrides

    write_authors_file("SimMatchV2", tmp_path / "300ep-res50-1p.pth", seed=9)
    saved = torch.load(tmp_path / "300ep-res50-1p.pth", weights_only=True)["state_dict"]
    run_dir = tmp_path / "run"
    res = call_tool("tools/train.py", "--cfg", str(CFG["SimMatchV2"]), *tiny_overrides(digits_root, run_dir, **{
        "optim.iters": 1, "optim.lr": "1.0e-30", "data.val_batch": 512,
        "model.init_from": str(tmp_path / "300ep-res50-1p.pth")}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the SimMatchV2 authors' checkpoint: the trunk and classifier of their student `main`" in res.stdout
    state = final_state(run_dir)["method"]
    theirs = {k[len("module.main."):]: v for k, v in saved.items() if k.startswith("module.main.backbone.")}
    theirs.update({f"backbone.fc.{p}": saved[f"module.main.fc.{p}"] for p in ("weight", "bias")})
    assert len(theirs) > 40
    for k, v in theirs.items():
        if "running_" not in k and "num_batches" not in k:
            for net in ("student.", "teacher.module."):
                torch.testing.assert_close(state[net + k], v, rtol=0, atol=1e-20, msg=net + k)
