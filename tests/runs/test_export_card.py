"""The model card carries the exported network's validation result: the eval record of the run's
metrics.jsonl at the checkpoint's iteration (top-1 and top-5, or k-NN top-1), or says plainly that
those weights were not evaluated."""
from __future__ import annotations

import json

from conftest import call_tool
from simmatch.weights.export import evaluation_card


def _eval(it, **values) -> dict:
    return {"kind": "eval", "iteration": it, "time": 1.7e9 + it, **values}


def test_the_card_takes_the_newest_eval_record_at_the_checkpoints_iteration():
    """Records at 100 and 200, and at 200 again after a resume from 100 (the weights of the newest
    checkpoint at 200): the card of iteration 200 has the last one's figures, exactly."""
    records = [_eval(100, teacher_top1=10.0, teacher_top5=30.0, student_top1=11.0, student_top5=31.0),
               _eval(200, teacher_top1=20.0, teacher_top5=40.0, student_top1=21.0, student_top5=41.0),
               {"kind": "resume", "iteration": 100, "world_size": 1, "from_iteration": 100, "from_world_size": 1},
               _eval(200, teacher_top1=85.0625, teacher_top5=99.5, student_top1=86.84, student_top5=100.0),
               {"kind": "finished", "iteration": 200, "total_iters": 200}]
    assert evaluation_card(records, 200, "teacher") == {
        "val_top1": "85.0625", "val_top5": "99.5", "val_iteration": "200",
        "evaluation": "teacher on the validation split at iteration 200: top-1 85.06%, top-5 99.50%"}
    student = evaluation_card(records, 200, "student")
    assert (student["val_top1"], student["val_top5"]) == ("86.84", "100.0")
    assert evaluation_card(records, 100, "student")["val_top1"] == "11.0"


def test_knn_top1_images_and_not_evaluated():
    records = [_eval(50, teacher_knn_top1=42.5, student_knn_top1=40.0, val_images=360),
               _eval(60, teacher_top1="85", student_top1=[1])]  # a hand edit: no figure to trust
    assert evaluation_card(records, 50, "teacher") == {
        "val_knn_top1": "42.5", "val_iteration": "50", "val_images": "360",
        "evaluation": "teacher on the validation split at iteration 50: k-NN top-1 42.50% of 360 images"}
    for it in (60, 70):  # text in the figures, or no record at that iteration (eval_every skipped it)
        assert evaluation_card(records, it, "teacher") == {
            "evaluation": f"not evaluated: metrics.jsonl has no evaluation of the teacher at iteration {it}"}


def test_an_exported_tiny_run_carries_its_final_evaluation(trained_run, tmp_path):
    """tools/export.py on a finished tiny run (8 iterations, evaluated at the end): the .safetensors
    metadata holds the figures of its metrics.jsonl eval record at iteration 8, for the network
    exported."""
    from safetensors import safe_open

    run = trained_run("run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in records if r["kind"] == "eval" and r["iteration"] == 8]
    for which in ("teacher", "student"):
        out = tmp_path / which / "model.pth"
        res = call_tool("tools/export.py", str(run), "--which", which, "--out", str(out))
        assert res.returncode == 0, res.stderr
        with safe_open(str(out.with_suffix(".safetensors")), "pt") as f:
            card = f.metadata()
        assert card["iteration"] == card["val_iteration"] == "8"
        assert float(card["val_top1"]) == final[f"{which}_top1"]
        assert float(card["val_top5"]) == final[f"{which}_top5"]
        assert f"model card: evaluation: {which} on the validation split at iteration 8: top-1 " \
               f"{final[f'{which}_top1']:.2f}%, top-5 {final[f'{which}_top5']:.2f}%" in res.stdout
    # a checkpoint copied out of its run directory: nothing to read its evaluation from
    loose = tmp_path / "loose.pt"
    for suffix in ("", ".sha256"):
        (tmp_path / f"loose.pt{suffix}").write_bytes((run / "checkpoints" / f"ckpt_000000008.pt{suffix}").read_bytes())
    res = call_tool("tools/export.py", str(loose), "--out", str(tmp_path / "loose" / "m.pth"))
    assert res.returncode == 0, res.stderr
    assert f"model card: evaluation: unknown: {loose} is not in a run directory with a metrics.jsonl" in res.stdout
