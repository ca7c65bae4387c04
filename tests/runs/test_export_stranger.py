"""Exports a stranger can load: the model card in the .safetensors metadata, a verified ONNX
file (nothing left behind on failure), and the best checkpoint kept apart from the recovery
checkpoints with stable `best` / `last` names that export and eval take."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision

from conftest import call_tool, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two runs; minutes on a loaded 2-core machine


def test_best_last_model_card_and_onnx(digits_root, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",  # in this process, as eval and export
                    *tiny_overrides(digits_root, run_dir, **{"optim.iters": 4, "train.eval_every": 1,
                                                             "train.ckpt_every": 1, "train.keep_ckpts": 1,
                                                             "data.val_batch": 512, "optim.lr": 0.2}))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [1, 2, 3, 4]
    top = max(r["teacher_top1"] for r in evals)
    best_it = next(r["iteration"] for r in evals if r["teacher_top1"] == top)  # the first to reach it
    assert json.loads((ckpts / "best.json").read_text()) == {"metric": "teacher_top1", "value": top,
                                                             "iteration": best_it, "by": "teacher"}
    # keep_ckpts=1 pruned every recovery checkpoint but the newest; the best is never pruned (best.pt and its
    # digest link to the file of the best iteration; older bests are removed)
    best_file = f"best_{best_it:09d}.pt"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == sorted(
        ["best.json", "best.pt", "best.pt.sha256", best_file, best_file + ".sha256", "ckpt_000000004.pt",
         "ckpt_000000004.pt.sha256", "last.pt"])
    assert os.readlink(ckpts / "last.pt") == "ckpt_000000004.pt"
    assert os.readlink(ckpts / "best.pt") == best_file
    assert torch.load(ckpts / "best.pt", weights_only=True)["iteration"] == best_it

    # eval and the .safetensors export in this process too (their command lines: tests/engine/test_train.py)
    res = call_tool("tools/eval.py", str(run_dir), "--which-ckpt", "best", "--which", "teacher")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["teacher_top1"] == pytest.approx(top)

    # .safetensors with the model card, from the best checkpoint
    out = tmp_path / "export" / "resnet.pth"
    res = call_tool("tools/export.py", str(run_dir), "--which-ckpt", "best", "--out", str(out))
    assert res.returncode == 0, res.stderr
    with safe_open(str(out.with_suffix(".safetensors")), "pt") as f:
        card = f.metadata()
    classes = sorted(p.name for p in (digits_root / "train").iterdir() if p.is_dir())
    assert card["arch"] == "resnet10" and json.loads(card["small_input_stem"]) is True
    assert int(card["num_classes"]) == 10 and json.loads(card["classes"]) == classes
    assert (int(card["resize"]), int(card["crop"])) == (16, 16) and int(card["iteration"]) == best_it
    assert json.loads(card["mean"]) == [0.485, 0.456, 0.406] and json.loads(card["std"]) == [0.229, 0.224, 0.225]
    # resnet10 has no torchvision constructor: the card names none and gives the lines that build it
    assert "constructor" not in card and "ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)" in card["build"]
    built: dict = {}
    exec(card["build"], built)  # noqa: S102 - the card's own lines, as a lab-mate would run them
    built["model"].load_state_dict(load_file(str(out.with_suffix(".safetensors"))))
    # the README's lines (resnet10 = BasicBlock x [1,1,1,1]; the small-input stem as the card says)
    model = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    model.load_state_dict(load_file(str(out.with_suffix(".safetensors"))))
    model.eval()
    built["model"].eval()
    probe = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(built["model"](probe), model(probe))
    # both files with the umask's mode (safetensors used to write 0600 beside a 0644 .pth)
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in (out, out.with_suffix(".safetensors"))}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {".pth": 0o666 & ~umask, ".safetensors": 0o666 & ~umask}, modes

    # ONNX of the same checkpoint: onnxruntime against the torchvision model, another batch size
    onnx_out = tmp_path / "export" / "resnet.onnx"
    res = call_tool("tools/export.py", str(run_dir), "--which-ckpt", "best", "--format", "onnx", "--out", str(onnx_out))
    assert res.returncode == 0, res.stderr
    assert "onnxruntime logits match" in res.stdout
    x = torch.randn(5, 3, 16, 16)
    session = onnxruntime.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(onnx_out)).metadata_props}
    assert json.loads(props["classes"]) == classes and props["arch"] == "resnet10"

    # A failed check leaves no file behind (not even the temporary one)
    from simmatch.errors import CheckpointError
    from simmatch.weights.export import export_onnx

    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(CheckpointError, match="nothing written"):
        export_onnx(run_dir, "teacher", bad / "m.onnx", tolerance=-1.0)
    assert list(bad.iterdir()) == []
