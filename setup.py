"""Build the compiled scheduler core (csrc/) into taskrunner's private
extension modules.  Everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE = ["_graph", "_calls", "_futures", "_mapped", "_params", "_engine", "_consume", "_remote",
        "_worker", "_stream"]

extensions = [
    Extension(
        f"taskrunner.{name}",
        [f"csrc/taskrunner/{name}.pyx"],
        include_dirs=["csrc/taskrunner"],
        extra_compile_args=["-O2"],
    )
    for name in CORE
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["csrc"],
        compiler_directives={"language_level": "3"},
    ),
)
