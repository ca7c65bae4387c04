#!/usr/bin/env python
"""Memory of SimMatchV2's banks per rank at given world sizes, from a config's own recipe.

Each rank holds the whole labeled bank (embeddings and classes) and the whole unlabeled bank
(K = method.v2_k x the global unlabeled batch: teacher embeddings [K x D] and aligned
probabilities [K x C], fp32). The banks are built as the method builds them and their
buffers' bytes are read back, not computed; the transient per-step tensors that grow with K
(each strong view's similarities, relation and its autograd copy: 3 x B_u x K floats per
view, plus the teacher's relation) are given beside them, computed.

  python benchmarks/bank_memory.py --cfg yaml/in1k_1pct_v2.yaml --world-size 8 32

Prints a table and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from simmatch.config import derive_scale, load_config  # noqa: E402
from simmatch.launch.recipe import split_sizes  # noqa: E402
from simmatch.methods.bank import LabeledBank  # noqa: E402
from simmatch.methods.simmatchv2.method import UnlabeledBank  # noqa: E402

GIB = 2**30


def buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def measure(cfg, world_size: int) -> dict:
    s = derive_scale(cfg, world_size)
    dim, classes = cfg.model.proj_dim, cfg.data.num_classes
    labeled = split_sizes(cfg).num_labeled or 0
    unl = UnlabeledBank(s.method_values['k'], dim, classes)
    lab = LabeledBank(labeled, dim, torch.zeros(labeled, dtype=torch.long), 0.0)
    views = cfg.data.num_strong
    transient = (3 * views + 1) * s.unlabeled_per_rank * s.method_values['k'] * 4
    row = {"world_size": world_size, "K": s.method_values['k'], "global_unlabeled": s.global_unlabeled,
           "unlabeled_bank_bytes": buffer_bytes(unl), "labeled_bank_bytes": buffer_bytes(lab),
           "formula_bytes": s.method_values['k'] * (dim + classes) * 4, "per_step_transient_bytes": transient}
    del unl, lab
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default="yaml/in1k_1pct_v2.yaml")
    ap.add_argument("--world-size", type=int, nargs="+", default=[8, 32])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.cfg, args.overrides)
    if cfg.method.name != "simmatchv2":
        raise SystemExit(f"error: {args.cfg} trains {cfg.method.name}; the unlabeled bank is SimMatchV2's")
    rows = [measure(cfg, w) for w in args.world_size]
    print(f"{'GPUs':>5} {'K':>9} {'unlabeled bank GiB':>19} {'K x (D + C) x 4 GiB':>20} {'labeled bank GiB':>17} "
          f"{'per-step GiB':>13}")
    for r in rows:
        print(f"{r['world_size']:>5} {r['K']:>9,} {r['unlabeled_bank_bytes'] / GIB:>19.3f} "
              f"{r['formula_bytes'] / GIB:>20.3f} {r['labeled_bank_bytes'] / GIB:>17.3f} "
              f"{r['per_step_transient_bytes'] / GIB:>13.3f}")
    print(f"per rank, fp32; D = {cfg.model.proj_dim}, C = {cfg.data.num_classes}, {cfg.data.num_strong} strong views; "
          f"per-step: similarities, relation and its autograd copy per view, and the teacher's relation (computed)")
    print(json.dumps({"benchmark": "bank_memory", "config": args.cfg, "dim": cfg.model.proj_dim,
                      "classes": cfg.data.num_classes, "strong_views": cfg.data.num_strong, "rows": rows}))


if __name__ == "__main__":
    main()
