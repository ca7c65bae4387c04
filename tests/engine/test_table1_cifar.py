"""The Table 1 recipe (yaml/cifar10_40.yaml) as a user runs it, on a CIFAR-10 archive the test writes
in torchvision's own format (tests/conftest_archives.py): WRN-28-2, the translated views, FixMatch's
RandAugment, SimMatch with the student's own targets and the temporal-ensemble bank. Made small in
batch and length only: it trains with DALI (CPU) and with torch, a SIGTERM and a resume end
bit-identical to the uninterrupted run, and the run exports."""
from __future__ import annotations

import pytest
from conftest_archives import write_cifar10

from conftest import ROOT, trained_stopped_resumed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ITERS = 6


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_class_train=8, per_class_test=3)


def recipe(root, run_dir, backend: str) -> list[str]:
    """yaml/cifar10_40.yaml at 8 + 16 images a step (L_in from step 2, so both halves are trained)."""
    return ["tools/train.py", "--cfg", str(ROOT / "yaml" / "cifar10_40.yaml"), f"data.root={root}",
            f"data.backend={backend}", f"data.num_threads={1 if backend == 'dali' else 0}", "data.device=cpu",
            "train.batch_size=8", "train.mu=2", "optim.base_batch=8", f"optim.iters={ITERS}", "train.ckpt_every=1",
            "train.log_every=1", f"train.eval_every={ITERS}", "method.simmatch.propagate_after_iters=2",
            f"train.run_dir={run_dir}"]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_table1_cifar10_40_trains_resumes_bit_identically_and_exports(cifar10, tmp_path, backend):
    ref_dir, b, _ = trained_stopped_resumed(lambda run_dir: recipe(cifar10, run_dir, backend), tmp_path, backend,
                                            ITERS, copy_at=4)
    log = (ref_dir / "log_rank0.txt").read_text()
    assert "40 labeled / 80 unlabeled images" in log and "median of the last" in log
    assert b["method"]["bank.features"].shape == (40, 128)
    assert b["config"]["model"]["arch"] == "wrn_28_2" and b["config"]["data"]["format"] == "cifar10"
