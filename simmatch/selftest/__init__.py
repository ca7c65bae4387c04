"""Self-test of a machine's GPU (or CPU) path: driver vs DALI, decoding, pipelines, collectives,
a training step, throughput and pinned memory, one PASS/FAIL/SKIP line each (tools/selftest.py).

`simmatch.selftest.runner.run(argv)` runs one rank; this package's own import is light (no
torch) so that tools/submit.py can check the options at submit time.
"""
