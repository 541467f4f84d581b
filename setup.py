"""Build of the C++ extension unlearn_fast._C; everything else is declared in pyproject.toml."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "unlearn_fast._C",
        sorted(["csrc/minhash.cpp", "csrc/module.cpp", "csrc/union_find.cpp"]),
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
