"""Memory a run allocates before its first step, held against what the machine has.

A bank sized by a typo (a bank of 99,999,999,999 global batches) used to fail deep inside the allocator with
a 614 TB traceback. The banks are built on the host and then moved to the device, so both must
hold them: the run is refused in one line, before anything is allocated, naming the bytes per
rank and the key that sizes the largest part.
"""
from __future__ import annotations

import os

import torch

from simmatch.config import Config, Derived
from simmatch.errors import ConfigError
from simmatch.methods.card import card_of, size_text


def host_available() -> int | None:
    """Bytes the host can still give (MemAvailable on Linux; free pages elsewhere), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def refuse_banks_beyond_memory(cfg: Config, derived: Derived, device: torch.device) -> dict[str, int]:
    """The banks' bytes per rank by name; a ConfigError when they exceed the host's available
    memory or, on a GPU, the device's free memory."""
    card = card_of(cfg.method.name)
    parts = card.memory(cfg, cfg.method.params, derived.method_values, derived.num_labeled) if card.memory else {}
    need = sum(parts.values())
    if not need:
        return parts
    places = [("this host", host_available())]
    if device.type == "cuda":
        places.append((str(device), torch.cuda.mem_get_info(device)[0]))
    for where, free in places:
        if free is not None and need > free:
            shown = ", ".join(f"{name} {size_text(n)}" for name, n in parts.items())
            raise ConfigError(f"the memory banks need {size_text(need)} per rank ({shown}), more than the "
                              f"{size_text(free)} available on {where}: lower the keys that size them "
                              f"(method.{cfg.method.name}.*, --print-config shows each bank)")
    return parts
