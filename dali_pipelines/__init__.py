"""DALI graphs of the streams; they import nothing from simmatch."""

# The graphs' operator layout. A DALI checkpoint restores only into the operators that wrote it,
# so a change that keeps every image's output but not the operators bumps this; a stream whose
# checkpoint names another layout replays its segment from the start instead (the same images
# and draws), as it does when the reader changed.
# 3: the CPU graphs' colour jitter is one compiled operator (jitter_kernel.py).
GRAPH_VERSION = 3
