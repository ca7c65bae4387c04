"""The SimMatch and SimMatchV2 authors' released checkpoints, read as this project's networks.

Their training scripts (SimMatch: simmatch.py; SimMatchV2: main.py) save
`{'epoch', 'arch', 'state_dict': model.state_dict(), 'optimizer'}` (SimMatchV2 adds `best_acc1`,
`best_acc5`, `scaler`), `model` being their DistributedDataParallel-wrapped model, hence the
`module.` prefix. Their evaluation (`--evaluate`) loads that file whole, and their README's files
(`simmatch-1p.pth`, `simmatch-10p.pth`; `300ep-res50-1p.pth`, `300ep-res50-10p.pth`) are such
checkpoints. The model (models/simmatch.py `SimMatch`, models/simmatchv2.py `SimMatchV2`) holds

- `main` (the student, trained by SGD; their `--evaluate` scores it) and `ema` (its EMA teacher),
  each their `ResNet`: `backbone` (torchvision's ResNet layers without `fc`), `fc` (the
  classifier), `head` (Linear - ReLU - Linear projection), and in SimMatchV2 `norm` (the
  LayerNorm of `--norm_feat` on the pooled feature; an Identity, holding nothing, without it);
- buffers: SimMatch `bank`, `labels`, `DA_queue`, `DA_ptr`; SimMatchV2 `l_bank`, `l_labels`,
  `ptr`, `u_bank`, `u_labels`, `da`.

Onto this project's `Network` (models/network.py): `backbone.*` stays, `fc.*` becomes
`backbone.fc.*`, `head.*` and `norm.*` stay. The buffers are training state, not read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from simmatch.errors import CheckpointError, UserError

NETWORKS = {"student": "main", "teacher": "ema"}  # this project's name -> theirs
PARTS = ("backbone.", "fc.", "head.", "norm.")  # of their ResNet
BUFFERS = {"SimMatch": ("bank", "labels", "DA_queue", "DA_ptr"),
           "SimMatchV2": ("l_bank", "l_labels", "ptr", "u_bank", "u_labels", "da")}
REPOS = {"SimMatch": "mingkai-zheng/SimMatch", "SimMatchV2": "mingkai-zheng/SimMatchV2"}


def few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The named tensors of a loaded file: their `state_dict` entry, or the file itself."""
    inner = state.get("state_dict") if isinstance(state.get("state_dict"), dict) else state
    return {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def unprefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without DDP's `module.` (their files have it on every name; a model saved unwrapped has not)."""
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def is_authors(tensors: dict[str, torch.Tensor]) -> bool:
    """Their layout: a `main.backbone.*` or `ema.backbone.*` trunk (after `module.`)."""
    return any(k.startswith(("main.backbone.", "ema.backbone.")) for k in unprefixed(tensors))


@dataclass
class AuthorsFile:
    """What one of their files holds: which code wrote it, its epoch, and each network it holds
    under this project's `Network` names (`student` = their `main`, `teacher` = their `ema`)."""

    layout: str  # SimMatch or SimMatchV2
    epoch: int | None
    networks: dict[str, dict[str, torch.Tensor]]

    def describe(self) -> str:
        epoch = f", epoch {self.epoch}" if self.epoch is not None else ""
        return f"the {self.layout} authors' checkpoint from {REPOS[self.layout]}{epoch}"


def layout_of(names: dict, arch: object) -> str:
    """SimMatchV2 by its buffers or its feature LayerNorm, SimMatch by its; else their `arch` entry."""
    if any(k.split(".")[0] in BUFFERS["SimMatchV2"] for k in names) or any(
            k.startswith(("main.norm.", "ema.norm.")) for k in names):
        return "SimMatchV2"
    if any(k.split(".")[0] in BUFFERS["SimMatch"] for k in names):
        return "SimMatch"
    return "SimMatchV2" if arch == "SimMatchV2" else "SimMatch"


def read_authors(state: dict, file: object) -> AuthorsFile:
    """The networks of one of their files; any other layout is refused naming the keys it did not
    expect (a few of them)."""
    tensors = unprefixed(state_tensors(state))
    if not is_authors(tensors):
        names = list(state_tensors(state)) or [str(k) for k in state]
        raise CheckpointError(
            f"{file} is neither a checkpoint of this project nor the SimMatch / SimMatchV2 authors' "
            f"(module.main.* / module.ema.*): unexpected keys {few(names) or 'none (it holds no tensors)'}")
    layout = layout_of(tensors, state.get("arch"))
    known = set(BUFFERS[layout])
    stray = [k for k in tensors if not (k.split(".")[0] in NETWORKS.values() and k.split(".", 1)[1].startswith(PARTS))
             and k.split(".")[0] not in known]
    if stray:
        raise CheckpointError(f"{file} looks like the {layout} authors' checkpoint but holds keys their "
                              f"model does not: unexpected keys {few(stray)}")
    networks: dict[str, dict[str, torch.Tensor]] = {}
    for ours, theirs in NETWORKS.items():
        prefix = theirs + "."
        net = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if net:
            networks[ours] = {("backbone." + k if k.startswith("fc.") else k): v for k, v in net.items()}
    epoch = state.get("epoch")
    return AuthorsFile(layout, int(epoch) if isinstance(epoch, int) else None, networks)


def authors_network(authors: AuthorsFile, which: str, file: object) -> dict[str, torch.Tensor]:
    """The student's (their `main`) or the teacher's (their `ema`) weights; a file holding only one
    refuses the other in one line."""
    if which not in NETWORKS:
        raise UserError(f"--which must be student or teacher, not {which!r}")
    if which not in authors.networks:
        (held,) = authors.networks
        raise CheckpointError(f"{file} holds only the {authors.layout} authors' {held} (`{NETWORKS[held]}`), "
                              f"not their {which} (`{NETWORKS[which]}`): use --which {held}")
    return authors.networks[which]


def trunk_of_authors(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """For model.init_from: their student's (`main`; `ema` when the file holds no `main`) trunk and
    classifier under torchvision's names, the rest of the file under its own names (reported as not
    used), and a note saying so; other layouts are returned as they are."""
    tensors = unprefixed(weights)
    if not is_authors(tensors):
        return weights, None
    layout = layout_of(tensors, None)
    theirs = "main" if any(k.startswith("main.backbone.") for k in tensors) else "ema"
    out: dict[str, torch.Tensor] = {}
    for (name, tensor), short in zip(weights.items(), tensors):  # `unprefixed` keeps the order
        for part in ("backbone.", "fc."):
            if short.startswith(f"{theirs}.{part}"):
                name = short[len(theirs) + 1 + (len(part) if part == "backbone." else 0):]
                break
        out[name] = tensor
    who = "student" if theirs == "main" else "teacher"
    return out, (f"the {layout} authors' checkpoint: the trunk and classifier of their {who} `{theirs}` "
                 f"(their projection head, feature LayerNorm, other network and banks are not loaded)")
