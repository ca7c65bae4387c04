"""FixMatch's RandAugment as USB lists it (semilearn/datasets/augmentation/randaugment.py), and the
sizes of the translated views and of Cutout: the one table the DALI graphs (ra_ops.py,
small_augment.py) and the torch backend (simmatch/data/small_augment.py) both draw from. No DALI
import: the torch backend reads it without DALI installed."""
from __future__ import annotations

PAD_FRACTION = 0.125  # the translation: up to 12.5 % of the side
CUTOUT_FILL = (125, 123, 114)
CUTOUT_MAX = 0.5  # the side of the Cutout square, as a fraction of the width: U[0, 0.5]
# (name, low, high): the op's level is drawn uniformly in [low, high)
RA_OPS: tuple[tuple[str, float, float], ...] = (
    ("auto_contrast", 0.0, 1.0),
    ("brightness", 0.05, 0.95),
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("equalize", 0.0, 1.0),
    ("identity", 0.0, 1.0),
    ("posterize", 4.0, 8.0),
    ("rotate", -30.0, 30.0),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("solarize", 0.0, 256.0),
    ("translate_x", -0.3, 0.3),
    ("translate_y", -0.3, 0.3),
)
OP_NAMES = tuple(name for name, _, _ in RA_OPS)


def pad_for(side: int, fraction: float = PAD_FRACTION) -> int:
    """The reflect padding of a translated view: `fraction` of the side, rounded (4 at 32, 12 at 96)."""
    return int(round(fraction * side))
