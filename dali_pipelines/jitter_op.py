"""jitter_kernel.jitter_image as a DALI CPU operator, compiled once per machine.

DALI's numba plugin (`NumbaFunction`) compiles its own wrappers around a kernel each time one
is made: 3 s per process that builds a CPU graph (every rank, every test process). Here the two
entry points DALI's NumbaFunction operator calls are numba `cfunc`s of that plugin's calling
convention (jitter_kernel.run_one_sample and output_shapes), cached on disk with the kernel, so
a process loads them (about 0.5 s) instead; the operator itself is the plugin's, given their
addresses. The calling convention is DALI's (nvidia-dali 2.4; setup.py pins the minor
version); tests/data/test_jitter_kernel.py runs it.
"""
from __future__ import annotations

import functools

from dali_pipelines.jitter_kernel import output_shapes, run_one_sample


@functools.cache
def jitter_operator():
    """The DALI operator: inputs (uint8 HWC images, float32 params as jitter_kernel.jitter_image
    reads them, float32 1 x 3 x 3 saturation matrices), output the jittered uint8 images (no
    layout set)."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba import NumbaFunction

    class CachedJitter(NumbaFunction):
        def __init__(self) -> None:  # NumbaFunction's own __init__ would compile its wrappers
            super(NumbaFunction, self).__init__(device="cpu")
            self.run_fn, self.setup_fn = run_one_sample.address, output_shapes.address
            self.out_types, self.in_types = [types.UINT8], [types.UINT8, types.FLOAT, types.FLOAT]
            self.outs_ndim, self.ins_ndim = [3], [3, 1, 3]
            self.num_outputs, self.batch_processing = 1, False
            self._preserve, self.blocks, self.threads_per_block = True, None, None

    return CachedJitter()
