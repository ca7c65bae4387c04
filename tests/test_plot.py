"""tools/plot.py: lr, loss components, training diagnostics and evaluation curves; runs of
different methods (different metric keys) share comparable panels."""
import json

from conftest import run_tool


def write_metrics(run_dir, train_keys, eval_keys, iters=(10, 20, 30)):
    run_dir.mkdir()
    lines = []
    for i in iters:
        lines.append({"kind": "train", "iteration": i, "lr": 0.1 / i, "img_s": 100.0, "time": 1e9 + i,
                      **{k: 1.0 / i for k in train_keys}})
        lines.append({"kind": "eval", "iteration": i, "time": 1e9 + i, **{k: float(i) for k in eval_keys}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_panels_for_runs_of_different_methods(tmp_path):
    import matplotlib.image

    write_metrics(tmp_path / "simmatch", ["loss", "loss_x", "loss_u", "loss_in", "mask", "pl_acc"],
                  ["student_top1", "teacher_top1"])
    write_metrics(tmp_path / "supervised", ["loss", "loss_x"], ["student_top1", "teacher_top1"])
    write_metrics(tmp_path / "isd", ["loss"], ["teacher_knn_top1"])
    out = tmp_path / "curves.png"
    res = run_tool("tools/plot.py", *(str(tmp_path / n) for n in ("simmatch", "supervised", "isd")),
                   "--out", str(out))
    assert res.returncode == 0, res.stderr
    panels = dict(line.strip().split(": ", 1) for line in res.stdout.splitlines()[1:])
    runs = {n: str(tmp_path / n) for n in ("simmatch", "supervised", "isd")}
    assert list(panels) == ["lr", "loss", "loss_in", "loss_u", "loss_x", "mask", "pl_acc",
                            "val student_top1", "val teacher_knn_top1", "val teacher_top1"]
    assert panels["lr"] == panels["loss"] == ", ".join(runs.values())
    assert panels["loss_x"] == f"{runs['simmatch']}, {runs['supervised']}"
    assert panels["mask"] == runs["simmatch"] and panels["val teacher_knn_top1"] == runs["isd"]
    assert panels["val teacher_top1"] == f"{runs['simmatch']}, {runs['supervised']}"
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (3 * 340, 4 * 450)  # 10 panels: 3 rows of 4 at 100 dpi
    assert image[..., :3].std() > 0.05  # something is drawn


def test_no_metrics_is_one_error_line(tmp_path):
    res = run_tool("tools/plot.py", str(tmp_path), "--out", str(tmp_path / "c.png"))
    assert res.returncode == 2 and res.stderr.startswith("error: no metrics file")
