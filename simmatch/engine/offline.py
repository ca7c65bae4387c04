"""Evaluate any checkpoint on the validation split of its own config (or overridden data), or one
of the SimMatch / SimMatchV2 authors' released checkpoints on that of a named config (--cfg):
classifier top-1/top-5, k-NN and linear-probe top-1 of the trunk's features."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from simmatch.config import derive_scale
from simmatch.engine.evaluate import evaluate
from simmatch.engine.representation import knn_accuracy, linear_probe
from simmatch.engine.trainer import amp_dtype
from simmatch.weights.networks import (
    PREFIXES,
    describe,
    held_networks,
    load_run_checkpoint,
    network_state,
    training_network,
)

MODES = ("classifier", "knn", "linear")


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), which: tuple[str, ...] = ("student", "teacher"),
                        device: str | None = None, modes: tuple[str, ...] = ("classifier",),
                        which_ckpt: str = "last", cfg_path: str | Path | None = None) -> dict:
    """{name}_top1/_top5 (classifier), {name}_knn_top1 and {name}_linear_top1 for each network;
    `which` both networks on a file that holds one (an authors' file may): that one."""
    from simmatch.data import build_streams

    file, state, cfg = load_run_checkpoint(path, which_ckpt, cfg_path, overrides)
    if set(which) == set(PREFIXES):
        which = tuple(w for w in which if w in held_networks(state))
    nets = {name: network_state(state, name, file) for name in which}  # refusals before the data is read
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale = derive_scale(cfg, 1)  # one process evaluates: every rank's data is its own
    streams = build_streams(cfg, scale, scale.ranks_of(0), 0, dev)
    dtype = amp_dtype(cfg, dev)
    cl, classes = cfg.train.channels_last, cfg.data.num_classes
    out: dict = {"checkpoint": str(file), "iteration": None if "authors" in state else int(state["iteration"]),
                 "source": describe(state),
                 "which": list(which), "count": streams.num_val}
    if "authors" in state:
        out["epoch"] = state["epoch"]

    def ctx():
        return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    for name in which:
        net = training_network(cfg, nets[name]).to(dev)
        if "classifier" in modes:
            res = evaluate(net, streams.val(), ctx(), cl)
            out[f"{name}_top1"], out[f"{name}_top5"] = res["top1"], res["top5"]
        if "knn" in modes:
            res = knn_accuracy(net, streams.labeled_eval(), streams.val(), classes,
                               cfg.train.knn_k, cfg.train.knn_temperature, ctx(), cl)
            out[f"{name}_knn_top1"] = res["knn_top1"]
        if "linear" in modes:
            out[f"{name}_linear_top1"] = linear_probe(net, streams.labeled_eval(), streams.val(),
                                                      classes, autocast=ctx(), channels_last=cl)["linear_top1"]
    streams.close()
    return out
