"""Faults that attacks on the tools found, each reproduced as it was found: a run directory's
contents tampered with or damaged by hand, and what the tools must say about it."""
from __future__ import annotations

import shutil

import pytest

from conftest import ROOT, call_tool, tiny_overrides

pytestmark = pytest.mark.slow  # finished tiny runs (trained_run)


def _files(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").iterdir()) if p.is_file()}


def test_a_checkpoint_copied_in_from_another_run_is_refused(trained_run, digits_root):
    """Another run's newer checkpoint, copied with its digest into this run's checkpoints/, used to
    be resumed silently (another lr, another length); now one line names it and nothing changes."""
    other = trained_run("other", **{"optim.lr": 0.1})
    run_dir = trained_run("run", **{"optim.iters": 2})  # shared with tests/engine/test_init_from.py
    for name in ("ckpt_000000008.pt", "ckpt_000000008.pt.sha256"):
        shutil.copy2(other / "checkpoints" / name, run_dir / "checkpoints" / name)
    before = _files(run_dir)
    overrides = tiny_overrides(digits_root, run_dir, **{"optim.iters": 2})
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *overrides)
    assert res.returncode != 0
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "ckpt_000000008.pt was written by another run or with another config" \
        in line, res.stderr
    assert "optim.lr (0.1 -> 0.05)" in line
    assert _files(run_dir) == before
    check = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--check", *overrides)
    assert check.returncode == 1 and "was written by another run or with another config" in check.stdout


@pytest.mark.parametrize("content, says", [
    (b"optim: [lr: 0.1\n", "is not valid YAML"),
    (b"- optim\n- train\n", "is a YAML list, not a mapping"),
    (bytes(range(256)), "is not a text file"),
    (b"", "is empty"),
])
def test_a_damaged_config_yaml_is_one_line_naming_it(trained_run, digits_root, content, says):
    """Not YAML, a list or binary used to be tracebacks; empty was compared with the defaults."""
    run_dir = trained_run("run")
    (run_dir / "config.yaml").write_bytes(content)
    before = _files(run_dir)
    overrides = tiny_overrides(digits_root, run_dir)
    for args in ([], ["--check"]):
        res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *args, *overrides)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        out = res.stdout if args else res.stderr.strip().splitlines()[-1]
        assert f"{run_dir / 'config.yaml'} (the run's saved config) {says}" in out, (res.stdout, res.stderr)
    assert _files(run_dir) == before and (run_dir / "config.yaml").read_bytes() == content


def test_without_config_yaml_the_newest_checkpoints_config_is_the_judge(trained_run, digits_root):
    """A deleted config.yaml used to let a resume with other values through silently."""
    run_dir = trained_run("run")
    (run_dir / "config.yaml").unlink()
    other_lr = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                         *tiny_overrides(digits_root, run_dir, **{"optim.lr": 0.2}))
    line = other_lr.stderr.strip().splitlines()[-1]
    assert other_lr.returncode != 0 and "optim.lr (0.05 -> 0.2)" in line
    # the refusal names the config that judged, not the config.yaml that is gone
    assert "config.yaml)" not in line and f"the config inside {run_dir}/checkpoints/ckpt_000000008.pt" in line, line
    longer = tiny_overrides(digits_root, run_dir, **{"optim.iters": 10})
    refused = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *longer)
    assert refused.returncode != 0 and "--allow-config-change" in refused.stderr.strip().splitlines()[-1]
    assert not (run_dir / "config.yaml").exists()
    same = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, run_dir))
    assert same.returncode == 0, same.stderr
    assert "judged against the config inside" in same.stderr and "already finished" in same.stdout
    assert (run_dir / "config.yaml").is_file()  # written again


def test_eval_takes_overrides_before_and_after_its_options(trained_run, digits_root):
    """`tools/eval.py RUN data.root=DIR --which teacher` used to be refused; train.py accepts it."""
    run_dir = trained_run("run")
    res = call_tool("tools/eval.py", str(run_dir), f"data.root={digits_root}", "--which", "teacher")
    assert res.returncode == 0, res.stderr
    assert "teacher" in res.stdout and "student" not in res.stdout


def test_plot_skips_lines_that_are_not_metrics_and_writes_into_the_run(trained_run):
    """Garbage lines in metrics.jsonl used to stop plot with ValueError; its default output was the
    current folder, and bookkeeping fields (steps, partial) got panels of their own."""
    run_dir = trained_run("run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('garbage\n{"kind": "train", "iteration": "abc", "loss": 1}\n'
                '{"kind": "train", "iteration": 3, "loss": "x"}\n[1, 2]\n')
    res = call_tool("tools/plot.py", str(run_dir))  # run from the repository root
    assert res.returncode == 0, res.stderr
    assert (run_dir / "curves.png").stat().st_size > 0 and not (ROOT / "curves.png").exists()
    panels = [ln.split(":")[0].strip() for ln in res.stdout.splitlines()[1:]]
    assert "loss" in panels and "lr" in panels and not {"steps", "partial"} & set(panels)
