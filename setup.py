# cffi's API-mode build hooks into setuptools through setup(cffi_modules=...), which pyproject.toml
# cannot express; everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["pi_backend/native/build_cffi.py:ffibuilder"])
