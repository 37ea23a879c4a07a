"""Builds the optional C helper unionfs._dircache (see unionfs/_dircache.c).

Everything else is in pyproject.toml.  The helper needs libfuse3's headers
(libfuse3-dev) and a compiler, both already needed to build pyfuse3; if it
cannot be built, unionfs works without it (the kernel then asks the daemon
for every directory listing).
"""

import subprocess

from setuptools import Extension, setup


def fuse3_cflags() -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/fuse3"]
    return out.split()


setup(
    ext_modules=[
        Extension(
            "unionfs._dircache",
            sources=[
                "unionfs/_dircache.c",
                "unionfs/_dispatch.c",
                "unionfs/_readpool.c",
                "unionfs/_prefetch.c",
            ],
            depends=["unionfs/_session.h"],
            extra_compile_args=fuse3_cflags(),
            libraries=["dl", "pthread"],
            optional=True,
        )
    ]
)
