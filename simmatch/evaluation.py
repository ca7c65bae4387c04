"""Evaluate any checkpoint on the validation split of its own config (or overridden data)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from simmatch.config import apply_overrides
from simmatch.engine.evaluate import evaluate
from simmatch.engine.trainer import amp_dtype
from simmatch.export import load_run_checkpoint, network_state, training_network


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), which: tuple[str, ...] = ("student", "teacher"),
                        device: str | None = None) -> dict:
    from simmatch.data import build_streams

    file, state, cfg = load_run_checkpoint(path)
    apply_overrides(cfg, list(overrides))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    streams = build_streams(cfg, 0, 1, dev)
    dtype = amp_dtype(cfg, dev)
    out: dict = {"checkpoint": str(file), "iteration": int(state["iteration"])}
    for name in which:
        net = training_network(cfg, network_state(state, name)).to(dev)
        ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        res = evaluate(net, streams.val(), ctx, cfg.train.channels_last)
        out[f"{name}_top1"], out[f"{name}_top5"], out["count"] = res["top1"], res["top5"], res["count"]
    return out
