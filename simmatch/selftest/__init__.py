"""Self-test of a machine's GPU (or CPU) path: driver vs DALI, decoding, pipelines, collectives,
a training step, throughput and pinned memory, one PASS/FAIL/SKIP line each (tools/selftest.py)."""
from simmatch.selftest.report import Check
from simmatch.selftest.runner import main, run

__all__ = ["Check", "main", "run"]
