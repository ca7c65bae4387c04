"""Is this file a decodable image? One check shared by check_data and the error mapping."""
from __future__ import annotations

from pathlib import Path


def image_problem(path: str | Path) -> str | None:
    """None if `path` fully decodes as an image, else a short reason (never raises)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # a full decode: catches truncated and corrupt data, not only headers
            if img.width < 1 or img.height < 1:
                return "empty image"
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # PIL raises many types for bad data
        return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
    return None
