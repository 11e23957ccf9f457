"""ROCm device queries through hip-python (the optional `rocm` extra), where ROCm is installed.

The HIP library of the kernels (libpi_backend_hip.so) answers what the engine needs (device present,
name, free memory). hip-python adds what a user asks when placing a model on an AMD GPU: the
architecture (gfx90a, gfx1100: which of the compiled --offload-arch targets runs), the wave size
(64 on CDNA, 32 on RDNA), compute units and total memory. Shown by `pi-backend info`.

    from pi_backend.native import rocm
    rocm.devices()   # [] without hip-python or without a ROCm runtime / device; never raises
"""
from __future__ import annotations

from typing import Any

__all__ = ["devices"]


def _hip():
    try:
        from hip import hip  # hip-python
    except Exception:  # not installed, or installed without a ROCm runtime to load
        return None
    return hip


def _ok(hip, err) -> bool:
    success = getattr(getattr(hip, "hipError_t", None), "hipSuccess", 0)
    return err == success or err == 0


def _properties(hip, device_id: int):
    """hip-python >= 7 returns (err, props); older releases fill a hipDeviceProp_t passed in."""
    try:
        out = hip.hipGetDeviceProperties(device_id)
    except TypeError:
        props = hip.hipDeviceProp_t()
        out = (hip.hipGetDeviceProperties(props, device_id), props)
    if isinstance(out, tuple) and len(out) == 2 and _ok(hip, out[0]):
        return out[1]
    return None


def _text(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        v = bytes(v).split(b"\0", 1)[0].decode(errors="replace")
    return str(v)


def devices() -> list[dict]:
    """One dict per ROCm device (id, name, arch, wave size, compute units, total memory in bytes)."""
    hip = _hip()
    if hip is None:
        return []
    try:
        out = hip.hipGetDeviceCount()
        err, count = out if isinstance(out, tuple) else (0, out)
        if not _ok(hip, err):
            return []
        found = []
        for i in range(int(count)):
            p = _properties(hip, i)
            if p is None:
                continue
            found.append({"id": i, "name": _text(p.name), "arch": _text(p.gcnArchName), "wave_size": int(p.warpSize),
                          "compute_units": int(p.multiProcessorCount), "total_bytes": int(p.totalGlobalMem)})
        return found
    except Exception:  # a half-working runtime: a query, never a crash
        return []
