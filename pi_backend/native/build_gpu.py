"""Build pi_backend's device libraries from the one kernel source, cuda/pi_kernels.cu.

    python pi_backend/native/build_gpu.py --cuda [--archs 80,86,89,90] [--strict]   # nvcc
    python pi_backend/native/build_gpu.py --hip  [--archs gfx90a,gfx1030,gfx1100]   # hipcc (ROCm)
    python pi_backend/native/build_gpu.py --emu  [--warp 64] [--sanitize]           # CPU emulator (g++)
    (--out DIR: where the library goes, default: next to this file, where device.py looks)

- libpi_backend_cuda.so: nvcc, one -O3 compile, SASS for sm_80/86/89/90 plus PTX of compute_90 (so
  newer GPUs JIT it), `--threads 2` compiles the targets in parallel, the CUDA runtime linked
  statically (the library needs only the driver, libcuda.so.1, and only once a call is made).
  PI_CUDA_ARCHS=80,90 overrides the list.
- libpi_backend_hip.so: `HIP_PLATFORM=amd hipcc --offload-arch=...` for gfx90a (CDNA2, wave64),
  gfx1030 (RDNA2, wave32), gfx1100 (RDNA3, wave32); PI_HIP_ARCHS overrides. An arch whose ROCm device
  library (oclc_isa_version_*.bc) is missing is left out with a note, unless --synth-isa-libs, which
  writes that one-constant bitcode file (Debian bookworm's rocm-device-libs 5.2.3 predate gfx11).
- libpi_backend_emu[_w64].so: the same kernels as plain C++ against cuda/gpu_emu.h, for tests on
  machines without a GPU (load it with PI_BACKEND_DEVICE_LIB).

Stdlib only: setup.py loads this file by path (setup_hook) before pi_backend is importable. Every
library is written to a temporary name and renamed into place, so a failed build never leaves a
half-written library for device.py to load.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "cuda" / "pi_kernels.cu"
HIP_SOURCE = HERE / "hip" / "pi_kernels_hip.cpp"
DEPENDS = [SOURCE, HIP_SOURCE, HERE / "cuda" / "gpu_emu.h", HERE / "cuda" / "gpu_compat.h", HERE / "include" / "pi_backend.h",
           HERE / "include" / "pi_half.h"]
CUDA_ARCHS = ("80", "86", "89", "90")
HIP_ARCHS = ("gfx90a", "gfx1030", "gfx1100")
CUDA_LIB, HIP_LIB = "libpi_backend_cuda.so", "libpi_backend_hip.so"


class BuildError(RuntimeError):
    pass


def _which(env: str, name: str, roots: list[str]) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    found = shutil.which(name)
    if found:
        return found
    for root in roots:
        if root and (pathlib.Path(root) / "bin" / name).is_file():
            return str(pathlib.Path(root) / "bin" / name)
    return None


def find_nvcc() -> str | None:
    """NVCC, nvcc on PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin."""
    return _which("NVCC", "nvcc", [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"])


def find_hipcc() -> str | None:
    """HIPCC, hipcc on PATH, $ROCM_PATH/bin, /opt/rocm/bin."""
    return _which("HIPCC", "hipcc", [os.environ.get("ROCM_PATH", ""), "/opt/rocm"])


def _archs(env: str, given: str | None, default: tuple[str, ...]) -> list[str]:
    text = given or os.environ.get(env, "")
    return [a.strip() for a in text.split(",") if a.strip()] or list(default)


def _run(cmd: list[str], env: dict | None = None, verbose: bool = True) -> float:
    if verbose:
        print("+", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if verbose and proc.stdout.strip():
        print(proc.stdout, end="" if proc.stdout.endswith("\n") else "\n", flush=True)
    if proc.returncode != 0:
        raise BuildError(f"{pathlib.Path(cmd[0]).name} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}")
    return time.monotonic() - t0


def _install(tmp: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def cuda_command(nvcc: str, out: pathlib.Path, archs: list[str], strict: bool) -> list[str]:
    host = "-fPIC,-fvisibility=hidden,-Wall,-Wextra" + (",-Werror" if strict else "")
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", host, "--threads", "2"]
    if strict:
        cmd += ["--Werror", "all-warnings"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return cmd + ["-o", str(out), str(SOURCE)]


def build_cuda(out_dir: pathlib.Path = HERE, archs: str | None = None, strict: bool = False,
               verbose: bool = True) -> pathlib.Path:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda)")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{CUDA_LIB}.{os.getpid()}.tmp"
    try:
        secs = _run(cuda_command(nvcc, tmp, _archs("PI_CUDA_ARCHS", archs, CUDA_ARCHS), strict), verbose=verbose)
        lib = _install(tmp, out_dir / CUDA_LIB)
    finally:
        tmp.unlink(missing_ok=True)
    if verbose:
        print(f"built {lib} in {secs:.1f} s", flush=True)
    return lib


def hip_bitcode_dir() -> pathlib.Path | None:
    """Where the ROCm device libraries (ocml, ockl, oclc_*.bc) live."""
    cands = [os.environ.get("HIP_DEVICE_LIB_PATH", ""), os.path.join(os.environ.get("ROCM_PATH", ""), "amdgcn/bitcode"),
             "/opt/rocm/amdgcn/bitcode", "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode", "/usr/lib/amdgcn/bitcode"]
    for c in cands:
        if c and (pathlib.Path(c) / "ocml.bc").is_file():
            return pathlib.Path(c)
    return None


def _isa_file(arch: str) -> str:
    return f"oclc_isa_version_{arch.removeprefix('gfx')}.bc"


def _synth_isa_lib(bitcode: pathlib.Path, arch: str, into: pathlib.Path, verbose: bool) -> bool:
    """A device-library dir with every file of `bitcode` plus a made-up oclc_isa_version for arch: that
    file holds one constant (__oclc_ISA_version = major*1000 + minor*100 + stepping), written here with
    llvm-dis / llvm-as from a sibling arch's file."""
    # the LLVM that built the device libraries or a newer one (an older llvm-dis cannot read them)
    rocm_llvm = pathlib.Path(os.environ.get("ROCM_PATH", "/opt/rocm")) / "llvm" / "bin"
    tools = [rocm_llvm] + sorted(pathlib.Path("/usr/lib").glob("llvm-*/bin"),
                                 key=lambda p: int("".join(c for c in p.parent.name if c.isdigit()) or 0), reverse=True)
    dis = next((str(t / "llvm-dis") for t in tools if (t / "llvm-dis").is_file()), shutil.which("llvm-dis"))
    asm = next((str(t / "llvm-as") for t in tools if (t / "llvm-as").is_file()), shutil.which("llvm-as"))
    donor = next(iter(sorted(bitcode.glob("oclc_isa_version_*.bc"))), None)
    digits = arch.removeprefix("gfx")
    if not (dis and asm and donor) or len(digits) != 4 or not digits.isdigit():
        return False
    into.mkdir(parents=True, exist_ok=True)
    for f in bitcode.glob("*.bc"):
        link = into / f.name
        if not link.exists():
            link.symlink_to(f)
    text = subprocess.run([dis, "-o", "-", str(donor)], capture_output=True, text=True, check=True).stdout
    version = int(digits[:2]) * 1000 + int(digits[2]) * 100 + int(digits[3])
    lines = [ln.split(" constant i32 ")[0] + f" constant i32 {version}, align 4" if "@__oclc_ISA_version" in ln else ln
             for ln in text.splitlines()]
    subprocess.run([asm, "-o", str(into / _isa_file(arch))], input="\n".join(lines) + "\n", text=True, check=True)
    if verbose:
        print(f"note: {_isa_file(arch)} missing from {bitcode}; synthesized (ISA version {version})", flush=True)
    return True


def build_hip(out_dir: pathlib.Path = HERE, archs: str | None = None, strict: bool = False,
              synth_isa_libs: bool = False, verbose: bool = True) -> pathlib.Path:
    hipcc = find_hipcc()
    if hipcc is None:
        raise BuildError("hipcc not found (PATH, $ROCM_PATH, /opt/rocm); scripts/install-hipcc.sh installs Debian's")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = _archs("PI_HIP_ARCHS", archs, HIP_ARCHS)
    bitcode = hip_bitcode_dir()
    extra: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        if bitcode is not None:
            missing = [a for a in wanted if not (bitcode / _isa_file(a)).is_file()]
            if missing and synth_isa_libs:
                libdir = pathlib.Path(scratch) / "bitcode"
                made = [a for a in missing if _synth_isa_lib(bitcode, a, libdir, verbose)]
                if made:
                    extra = [f"--rocm-device-lib-path={libdir}"]
                missing = [a for a in missing if a not in made]
            for a in missing:
                print(f"note: skipping {a}: the ROCm device libraries in {bitcode} have no {_isa_file(a)} "
                      "(too old for this GPU; --synth-isa-libs makes one)", flush=True)
            wanted = [a for a in wanted if a not in missing]
        if not wanted:
            raise BuildError("no HIP target left to build")
        tmp = out_dir / f".{HIP_LIB}.{os.getpid()}.tmp"
        cmd = [hipcc, *(f"--offload-arch={a}" for a in wanted), *extra, "-O3", "-std=c++17", "-fPIC", "-shared",
               "-fvisibility=hidden", "-Wall", "-Wextra", *(["-Werror"] if strict else []), "-o", str(tmp), str(HIP_SOURCE)]
        env = dict(os.environ, HIP_PLATFORM="amd")
        try:
            secs = _run(cmd, env=env, verbose=verbose)
            lib = _install(tmp, out_dir / HIP_LIB)
        finally:
            tmp.unlink(missing_ok=True)
    if verbose:
        print(f"built {lib} ({', '.join(wanted)}) in {secs:.1f} s", flush=True)
    return lib


def emu_name(warp: int = 32, sanitize: bool = False) -> str:
    return f"libpi_backend_emu{'' if warp == 32 else f'_w{warp}'}{'_asan' if sanitize else ''}.so"


def build_emu(out_dir: pathlib.Path = HERE, warp: int = 32, sanitize: bool = False, verbose: bool = True) -> pathlib.Path:
    """The kernels as plain C++ on the CPU emulator (cuda/gpu_emu.h)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise BuildError("no C++ compiler (g++) for the emulator build")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{emu_name(warp, sanitize)}.{os.getpid()}.tmp"
    cmd = [cxx, "-x", "c++", "-std=c++17", "-DPI_GPU_EMULATE", f"-DPI_EMU_WARP={warp}", "-O1", "-g", "-shared",
           "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror"]
    if sanitize:
        cmd += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    cmd += ["-o", str(tmp), str(SOURCE)]
    try:
        secs = _run(cmd, verbose=verbose)
        lib = _install(tmp, out_dir / emu_name(warp, sanitize))
    finally:
        tmp.unlink(missing_ok=True)
    if verbose:
        print(f"built {lib} in {secs:.1f} s", flush=True)
    return lib


def up_to_date(lib: pathlib.Path) -> bool:
    return lib.is_file() and lib.stat().st_mtime >= max(p.stat().st_mtime for p in DEPENDS if p.exists())


def setup_hook(build_ext_cmd) -> None:
    """Called by setup.py's build_ext after the CPU module is built: compile libpi_backend_cuda.so when
    nvcc is found, unless PI_BACKEND_CUDA=0. Never fails the install: a CPU-only build must not care."""
    if os.environ.get("PI_BACKEND_CUDA", "1") == "0":
        print("pi_backend: PI_BACKEND_CUDA=0, not building the CUDA library", flush=True)
        return
    if find_nvcc() is None:
        print("pi_backend: nvcc not found, building without the CUDA library", flush=True)
        return
    targets = [pathlib.Path(build_ext_cmd.build_lib) / "pi_backend" / "native"]
    if getattr(build_ext_cmd, "inplace", False) or getattr(build_ext_cmd, "editable_mode", False):
        targets.insert(0, HERE)  # editable / in-place: the library goes next to device.py in the tree
    try:
        first = targets[0] / CUDA_LIB
        lib = first if up_to_date(first) else build_cuda(targets[0])
        for t in targets[1:]:
            t.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, t / CUDA_LIB)
    except (BuildError, OSError) as e:
        print(f"pi_backend: WARNING: the CUDA library was not built ({e}); the CPU backend is unaffected",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuda", action="store_true", help="build libpi_backend_cuda.so with nvcc (the default)")
    ap.add_argument("--hip", action="store_true", help="build libpi_backend_hip.so with hipcc")
    ap.add_argument("--emu", action="store_true", help="build the CPU emulator library (g++)")
    ap.add_argument("--out", type=pathlib.Path, default=HERE, help="output directory (default: %(default)s)")
    ap.add_argument("--archs", help="comma-separated targets (CUDA: 80,86,..; HIP: gfx90a,..)")
    ap.add_argument("--strict", action="store_true", help="warnings are errors")
    ap.add_argument("--synth-isa-libs", action="store_true", help="HIP: synthesize missing oclc_isa_version files")
    ap.add_argument("--warp", type=int, default=32, choices=(32, 64), help="emulator warp size")
    ap.add_argument("--sanitize", action="store_true", help="emulator with ASan + UBSan")
    args = ap.parse_args(argv)
    try:
        if args.cuda or not (args.hip or args.emu):
            build_cuda(args.out, args.archs if not args.hip else None, args.strict)
        if args.hip:
            build_hip(args.out, args.archs if not args.cuda else None, args.strict, args.synth_isa_libs)
        if args.emu:
            build_emu(args.out, args.warp, args.sanitize)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
