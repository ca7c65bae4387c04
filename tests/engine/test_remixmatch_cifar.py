"""ReMixMatch's Table 1 recipe (yaml/cifar10_250.yaml with method.name=remixmatch: K strong views,
CTAugment, MixUp, rotation, Adam) as a user runs it, on a CIFAR-10 archive the test writes in
torchvision's own format. Made small in batch, views and length only: it trains with DALI (CPU) and
with torch; a SIGTERM and a resume end bit-identical to the uninterrupted run, CTAugment's learned
rates included; the run exports."""
from __future__ import annotations

import pytest
import torch
from conftest_archives import write_cifar10

from conftest import ROOT, trained_stopped_resumed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ITERS = 6


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_class_train=8, per_class_test=3)


def recipe(root, run_dir, backend: str) -> list[str]:
    """8 labeled + 8 unlabeled images a step, 2 strong views each, the ramp-up over 3 steps."""
    return ["tools/train.py", "--cfg", str(ROOT / "yaml" / "cifar10_250.yaml"), "method.name=remixmatch",
            f"data.root={root}", "data.labeled_per_class=4", f"data.backend={backend}",
            f"data.num_threads={1 if backend == 'dali' else 0}", "data.device=cpu", "data.num_strong=2",
            "train.batch_size=8", "optim.base_batch=8", f"optim.iters={ITERS}", "train.ckpt_every=1",
            "train.log_every=1", f"train.eval_every={ITERS}", "method.remixmatch.rampup_iters=3",
            f"train.run_dir={run_dir}"]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_remixmatch_cifar10_trains_resumes_bit_identically_and_exports(cifar10, tmp_path, backend):
    ref_dir, b, resumed = trained_stopped_resumed(lambda run_dir: recipe(cifar10, run_dir, backend), tmp_path,
                                                  backend, ITERS, copy_at=4)
    log = (ref_dir / "log_rank0.txt").read_text()
    assert "40 labeled / 80 unlabeled images" in log and "median of the last" in log
    assert b["config"]["method"]["name"] == "remixmatch"
    assert b["config"]["optim"]["name"] == "adam" and b["config"]["data"]["num_strong"] == 2
    rates = b["method"]["cta.rates"]
    assert not torch.equal(rates, torch.ones_like(rates))  # the policy has learned from 6 x 8 probes
    assert b["method"]["student.rotation.weight"].shape[0] == 4
    assert torch.equal(resumed["method"]["cta.rates"], rates)
