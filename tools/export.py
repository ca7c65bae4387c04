#!/usr/bin/env python
"""Export trained weights as a torchvision ResNet state_dict (.pth and .safetensors), or ONNX.

`python tools/export.py RUN_DIR|CKPT --which student|teacher --out FILE [--head-out FILE]
 [--which-ckpt last|best] [--format torch|onnx]`
`python tools/export.py AUTHORS.pth --cfg yaml/in1k_1pct.yaml --which student|teacher --out FILE [key=value ...]`:
one of the SimMatch / SimMatchV2 authors' released checkpoints, which holds no config (the model
card's arch, classes and preprocessing come from --cfg and the overrides); student = their `main`,
teacher = their `ema`.
The result loads into `torchvision.models.resnet50()` with strict=True, fc included; the
.safetensors (and .onnx) metadata holds the architecture, stem, classes and preprocessing, and
the exported network's validation result at the checkpoint's iteration from the run's
metrics.jsonl (val_top1, val_top5 or val_knn_top1, val_iteration; `evaluation` says it in words,
or that it was not evaluated).
ONNX: onnxruntime must give the PyTorch logits within 1e-4, or nothing is written.
A run directory gives its newest checkpoint that passes its integrity check (a damaged newer
one is named and skipped); a named checkpoint file that fails it is an error. The files are
written under temporary names, checked, and only then renamed into place.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.errors import cli_errors  # noqa: E402


@cli_errors
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="run directory (newest checkpoint) or checkpoint file")
    ap.add_argument("--which", default="teacher", choices=["student", "teacher"],
                    help="which network to export (default: teacher, the EMA model)")
    ap.add_argument("--out", required=True, help="output path; .pth and .safetensors are written")
    ap.add_argument("--head-out", default=None, help="also write the projection head here")
    ap.add_argument("--which-ckpt", default="last", choices=["last", "best"],
                    help="in a run directory: the newest checkpoint (last) or the one of the best "
                         "validation top-1 (best, checkpoints/best.pt)")
    ap.add_argument("--format", default="torch", choices=["torch", "onnx"],
                    help="torch: .pth + .safetensors (default); onnx: a verified .onnx file")
    ap.add_argument("--cfg", default=None, help="the config of an authors' checkpoint (it holds none)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=DIR (the class names)")
    args = ap.parse_intermixed_args()  # options before or after the overrides
    from simmatch.weights.export import export, export_onnx

    if args.format == "onnx":
        res = export_onnx(args.source, args.which, args.out, args.which_ckpt, cfg_path=args.cfg,
                          overrides=args.overrides)
        print(f"exported {args.which} of {res['checkpoint']} ({res['source']}) to {res['written'][0]}")
        print(f"check: onnxruntime logits match PyTorch's (max abs diff {res['max_abs_diff']:.3g} "
              f"<= {res['tolerance']:g})")
        print(f"model card: evaluation: {res['metadata']['evaluation']}")
        return 0
    res = export(args.source, args.which, args.out, args.head_out, args.which_ckpt, args.cfg, args.overrides)
    ok = res["max_abs_diff"] == 0.0
    print(f"exported {args.which} of {res['checkpoint']} ({res['source']}, {res['arch']}"
          f"{', small-input stem' if res['small_input'] else ''})")
    for p in res["written"]:
        print(f"  wrote {p}")
    print(f"check: exported logits {'equal' if ok else 'DIFFER FROM'} the training model's "
          f"(max abs diff {res['max_abs_diff']:.3g})" + ("" if ok else "; nothing written"))
    if ok:
        print(f"model card: evaluation: {res['metadata']['evaluation']}")
    return 0 if ok else 1


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main, heavy=("torch", "torchvision"))
