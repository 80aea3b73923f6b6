"""Build hook for the one optional C extension; everything else is in pyproject.toml.

``kservice.plugins.mmap._ringfast`` is the compiled fast path of the shared-memory
ring.  It is optional: where it cannot be compiled (no C compiler, no Python
headers, not Linux on x86-64) the install still succeeds and the ring runs its
pure-Python code, which speaks the same protocol.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kservice.plugins.mmap._ringfast",
            sources=["plugins/mmap/_ringfast.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            libraries=["pthread"],  # glibc < 2.34 keeps the robust-mutex calls in libpthread
            optional=True,
        )
    ],
)
