"""Build the compiled scheduler core (csrc/) into taskrunner's private
extension modules.  Everything else is in pyproject.toml.

TASKRUNNER_SANITIZE=address builds the core with AddressSanitizer and
UndefinedBehaviorSanitizer, TASKRUNNER_SANITIZE=thread with ThreadSanitizer
(-O1 -g, frame pointers kept).  An instrumented module only loads with the
sanitizer's runtime preloaded into an uninstrumented python:
LD_PRELOAD=$(gcc -print-file-name=libasan.so) (or libtsan.so); see the
README's "Sanitizers" section and .ci/run.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE = ["_graph", "_calls", "_futures", "_mapped", "_params", "_trace", "_engine", "_consume",
        "_remote", "_retry", "_worker", "_stream"]

SANITIZERS = {
    # UBSan's checks stop the process at the first report (-fno-sanitize-recover),
    # so a CI run cannot pass over one.
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    "thread": ["-fsanitize=thread"],
}


def _sanitizer_flags():
    name = os.environ.get("TASKRUNNER_SANITIZE", "").strip()
    if not name:
        # -O3, as CPython's own flags have it: at -O2 gcc leaves the graph's
        # small per-run steps as calls (see benchmarks/RESULTS.md).
        return ["-O3"], []
    if name not in SANITIZERS:
        raise SystemExit(
            f"TASKRUNNER_SANITIZE={name!r}: expected one of {', '.join(sorted(SANITIZERS))}")
    flags = SANITIZERS[name] + ["-fno-omit-frame-pointer", "-g", "-O1"]
    link = [f for f in SANITIZERS[name] if f.startswith("-fsanitize=")]
    return flags, link


compile_args, link_args = _sanitizer_flags()

extensions = [
    Extension(
        f"taskrunner.{name}",
        [f"csrc/taskrunner/{name}.pyx"],
        include_dirs=["csrc/taskrunner"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
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
