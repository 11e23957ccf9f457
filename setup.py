# cffi's API-mode build hooks into setuptools through setup(cffi_modules=...), which pyproject.toml
# cannot express; everything else lives in pyproject.toml.
import importlib.util
import pathlib

from setuptools import setup
from setuptools.command.build_ext import build_ext


# ---- GPU hook (issue 7): once the CPU module is built, compile libpi_backend_cuda.so with nvcc when it
# is found (PATH, $CUDA_HOME, /usr/local/cuda), unless PI_BACKEND_CUDA=0. A missing or failing nvcc only
# prints a warning: CPU-only installs are unaffected. The logic is pi_backend/native/build_gpu.py's
# setup_hook (loaded by path: pi_backend itself is not importable at build time).
class build_ext_with_gpu(build_ext):
    def run(self):
        super().run()
        path = pathlib.Path(__file__).resolve().parent / "pi_backend" / "native" / "build_gpu.py"
        spec = importlib.util.spec_from_file_location("pi_backend_build_gpu", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.setup_hook(self)


setup(
    cffi_modules=["pi_backend/native/build_cffi.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_with_gpu},
)
