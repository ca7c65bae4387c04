"""tools/plot.py: lr, loss components, training diagnostics and evaluation curves; runs of
different methods (different metric keys) share comparable panels, each run in one colour; a metric
of one value is drawn as that value. The tool runs in this process (conftest.call_tool) but for one
test of its command line."""
import importlib.util
import json

import matplotlib
import pytest

matplotlib.use("Agg")
# Building matplotlib's font cache runs `fc-list` (a process) the first time on a machine: here, at
# collection, not inside a fast-tier test, where starting a process fails the test.
import matplotlib.font_manager  # noqa: E402,F401
import matplotlib.pyplot as plt  # noqa: E402

from conftest import ROOT, call_tool, run_tool  # noqa: E402


def plot_tool():
    """tools/plot.py as a module, for its draw() (the figure, before it is saved)."""
    spec = importlib.util.spec_from_file_location("tool_plot", ROOT / "tools" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_metrics(run_dir, train_keys, eval_keys, iters=(10, 20, 30)):
    run_dir.mkdir()
    lines = []
    for i in iters:
        lines.append({"kind": "train", "iteration": i, "lr": 0.1 / i, "img_s": 100.0, "time": 1e9 + i,
                      **{k: 1.0 / i for k in train_keys}})
        lines.append({"kind": "eval", "iteration": i, "time": 1e9 + i, **{k: float(i) for k in eval_keys}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_panels_for_runs_of_different_methods(tmp_path):
    write_metrics(tmp_path / "simmatch", ["loss", "loss_x", "loss_u", "loss_in", "mask", "pl_acc"],
                  ["student_top1", "teacher_top1"])
    write_metrics(tmp_path / "supervised", ["loss", "loss_x"], ["student_top1", "teacher_top1"])
    write_metrics(tmp_path / "isd", ["loss"], ["teacher_knn_top1"])
    out = tmp_path / "curves.png"
    res = call_tool("tools/plot.py", *(str(tmp_path / n) for n in ("simmatch", "supervised", "isd")),
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
    image = plt.imread(out)
    assert image.shape[:2] == (3 * 340, 4 * 450)  # 10 panels: 3 rows of 4 at 100 dpi
    assert image[..., :3].std() > 0.05  # something is drawn


def _lines_by_run(fig) -> dict[str, dict[str, str]]:
    """{panel title: {run: colour}} of the lines drawn in each visible panel."""
    from matplotlib.colors import to_hex

    return {ax.get_title().splitlines()[0]: {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()}
            for ax in fig.axes if ax.get_visible()}


def test_each_run_keeps_one_colour_in_every_panel(tmp_path):
    """Three runs of different methods: the knn panel holds only the third run and loss_x only
    the first two, yet every run is drawn in its own one colour everywhere."""
    write_metrics(tmp_path / "simmatch", ["loss", "loss_x", "mask"], ["teacher_top1"])
    write_metrics(tmp_path / "supervised", ["loss", "loss_x"], ["teacher_top1"])
    write_metrics(tmp_path / "isd", ["loss"], ["teacher_knn_top1"])
    runs = [tmp_path / n for n in ("simmatch", "supervised", "isd")]
    fig, drawn, _ = plot_tool().draw(runs)
    try:
        panels = _lines_by_run(fig)
    finally:
        plt.close(fig)
    assert panels["val teacher_knn_top1"].keys() == {str(runs[2])}  # the panel that shifted colours
    assert panels["loss_x"].keys() == {str(runs[0]), str(runs[1])}
    colours = {}
    for panel in panels.values():
        for run, colour in panel.items():
            colours.setdefault(run, set()).add(colour)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({c.pop() for c in colours.values()}) == 3  # and three runs, three colours


def test_a_metric_of_one_value_is_drawn_as_that_value(tmp_path):
    """A demo run evaluates once: each val panel is its one value, a marker with the number beside
    it, on an axis whose only tick is that value and whose limits stay near it (not a top-5 of 100
    on an axis running to 104); the losses, with three points, stay curves."""
    run = tmp_path / "demo"
    write_metrics(run, ["loss"], [], iters=(10, 20, 30))
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "eval", "iteration": 30, "teacher_top1": 85.06, "teacher_top5": 100.0}) + "\n")
    fig, drawn, _ = plot_tool().draw([run])
    try:
        axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        assert list(axes) == ["lr", "loss", "val teacher_top1", "val teacher_top5"]
        for title, value, text in (("val teacher_top1", 85.06, "85.06"), ("val teacher_top5", 100.0, "100")):
            ax = axes[title]
            (line,) = ax.get_lines()
            assert list(line.get_xdata()) == [30] and list(line.get_ydata()) == [value]
            assert line.get_marker() == "o" and line.get_linestyle() == "None"
            assert [t.get_text() for t in ax.texts] == [text]
            assert list(ax.get_yticks()) == [value] and list(ax.get_xticks()) == [30]
            low, high = ax.get_ylim()
            assert value - 3 < low < value < high < value + 3, (title, low, high)
        (loss,) = axes["loss"].get_lines()
        assert loss.get_linestyle() == "-" and not axes["loss"].texts and len(axes["loss"].get_yticks()) > 2
    finally:
        plt.close(fig)


@pytest.mark.slow
def test_no_metrics_is_one_error_line(tmp_path):
    res = run_tool("tools/plot.py", str(tmp_path), "--out", str(tmp_path / "c.png"))
    assert res.returncode == 2 and res.stderr.startswith("error: no metrics file")


def test_history_after_a_crash_and_an_elastic_resume(tmp_path):
    """2 ranks log 10..50 with a checkpoint at 40 and die; 1 rank resumes (iteration 40 -> 80,
    simmatch/checkpoint/elastic.py) and logs 90, 100. The history that led to the weights: 10..40 at twice
    their iteration (steps of the 1-rank batch), the lost record at 50 left out, then 90, 100."""
    from simmatch.engine.metrics import read_metrics, trained_history

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "iteration": i, "world_size": 2, "lr": 0.1, "loss": 1.0 / i} for i in (10, 20, 30, 40)]
    rows.append({"kind": "eval", "iteration": 40, "teacher_top1": 50.0})
    rows.append({"kind": "train", "iteration": 50, "world_size": 2, "lr": 0.1, "loss": 0.02})  # lost
    rows.append({"kind": "resume", "iteration": 80, "world_size": 1, "from_iteration": 40, "from_world_size": 2})
    rows += [{"kind": "train", "iteration": i, "world_size": 1, "lr": 0.05, "loss": 1.0 / i} for i in (90, 100)]
    rows.append({"kind": "eval", "iteration": 100, "teacher_top1": 60.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    history, rescaled = trained_history(read_metrics(run))
    assert rescaled
    train = history[history["kind"] == "train"]
    assert list(train["iteration"]) == [20.0, 40.0, 60.0, 80.0, 90.0, 100.0]
    assert list(train["logged_iteration"]) == [10, 20, 30, 40, 90, 100]
    assert list(history[history["kind"] == "eval"]["iteration"]) == [80.0, 100.0]
    assert "resume" not in set(history["kind"]) and 0.02 not in set(train["loss"])

    res = call_tool("tools/plot.py", str(run), "--out", str(tmp_path / "c.png"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == f"{run}: iterations before an elastic resume drawn in steps of the last global batch"
    assert [line.split(":")[0].strip() for line in lines[1:-1]] == ["lr", "loss", "val teacher_top1"]


def test_same_world_resume_keeps_iterations_and_drops_lost_records(tmp_path):
    from simmatch.engine.metrics import read_metrics, trained_history

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "iteration": i, "loss": 1.0} for i in (1, 2, 3)]
    rows.append({"kind": "resume", "iteration": 2, "world_size": 3, "from_iteration": 2, "from_world_size": 3})
    rows += [{"kind": "train", "iteration": i, "loss": 2.0} for i in (3, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    history, rescaled = trained_history(read_metrics(run))
    assert not rescaled
    assert list(history["iteration"]) == [1, 2, 3, 4] and list(history["loss"]) == [1.0, 1.0, 2.0, 2.0]


def test_a_line_cut_by_a_crash_is_skipped_and_an_empty_log_is_one_error_line(tmp_path):
    """SIGKILL during an append leaves half a JSON line: the curves are still drawn from the rest."""
    run = tmp_path / "run"
    write_metrics(run, ["loss"], ["teacher_top1"])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "iteration": 40, "lo')
    res = call_tool("tools/plot.py", str(run), "--out", str(tmp_path / "c.png"))
    assert res.returncode == 0, res.stderr
    assert [line.split(":")[0].strip() for line in res.stdout.splitlines()[1:]] == ["lr", "loss", "val teacher_top1"]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    res = call_tool("tools/plot.py", str(empty), "--out", str(tmp_path / "e.png"))
    assert res.returncode != 0
    assert res.stderr.strip() == f"error: no metrics recorded yet in {empty / 'metrics.jsonl'}"


def test_the_record_after_a_torn_line_is_kept(tmp_path):
    """SIGKILL mid-append leaves a line without its newline; the resumed process's first record
    (its resume record) must start a line of its own, not be glued onto the torn one."""
    from simmatch.engine.metrics import MetricsFile
    from simmatch.run.jsonl import read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "iteration": 1}) + "\n" + '{"kind": "train", "itera')
    metrics = MetricsFile(path, enabled=True)
    metrics.write({"kind": "resume", "iteration": 1, "world_size": 1, "from_iteration": 1, "from_world_size": 1})
    metrics.write({"kind": "train", "iteration": 2})
    assert [(r["kind"], r["iteration"]) for r in read_records(path)] == [("train", 1), ("resume", 1), ("train", 2)]
    MetricsFile(path, enabled=True)  # a file that ends cleanly is left as it is
    assert path.read_text().count("\n") == 4 and path.read_text().endswith("}\n")
