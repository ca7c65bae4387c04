"""The NVIDIA driver's CUDA version against the CUDA build of the installed DALI wheel.

The driver's CUDA version comes from libcuda's cuDriverGetVersion (what the driver supports,
needs no GPU context and no torch), the driver release from nvidia-smi (for the message).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import shutil
import subprocess

from simmatch.selftest.report import FAIL, PASS, SKIP, Check

# oldest driver release of each CUDA major version (CUDA's minor-version compatibility)
MIN_DRIVER = {12: "r525", 13: "r580"}
OTHER_EXTRA = {13: "dali-cuda120", 12: "dali"}


def driver_cuda_version() -> int | None:
    """CUDA version the installed driver supports, as 1000*major + 10*minor; None without one."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value


def driver_release() -> str | None:
    """The driver's release string (e.g. 580.65.06) from nvidia-smi, if it is there."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[0] if lines else None


def dali_variant() -> tuple[str, str, int] | None:
    """(wheel name, version, CUDA major it was built for) of the installed DALI; None if absent."""
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith("nvidia-dali-cuda"):
            digits = name.rsplit("cuda", 1)[1]
            return name, dist.version, int(digits[:-1]) if len(digits) > 2 else int(digits)
    return None


def check_driver(driver_cuda: int | None, dali: tuple[str, str, int] | None,
                 release: str | None = None) -> Check:
    """PASS when the driver supports the CUDA major version the DALI wheel was built for."""
    name = "driver"
    if dali is None:
        return Check(name, SKIP, "NVIDIA DALI is not installed (data.backend=torch still works)",
                     "pip install -e '.[dali]' (CUDA 13 drivers) or '.[dali-cuda120]' (CUDA 12)")
    wheel, version, needs = dali
    if driver_cuda is None:
        return Check(name, SKIP, f"no NVIDIA driver (libcuda.so.1 not found): {wheel} {version} "
                                 "runs its CPU operators only", "run on a GPU node")
    major, minor = driver_cuda // 1000, (driver_cuda % 1000) // 10
    drv = f"driver {release} " if release else "the driver "
    seen = f"{drv}supports CUDA {major}.{minor}; {wheel} {version} needs CUDA {needs} " \
           f"({MIN_DRIVER.get(needs, 'a matching driver')}+)"
    if major >= needs:
        return Check(name, PASS, seen)
    other = OTHER_EXTRA.get(needs, "dali-cuda120")
    return Check(name, FAIL, seen,
                 f"pip uninstall -y {wheel} && pip install -e '.[{other}]' "
                 f"(or update the driver to {MIN_DRIVER.get(needs, 'a newer release')}+)")


def run() -> Check:
    return check_driver(driver_cuda_version(), dali_variant(), driver_release())
