"""unionfs: a rootless userspace union filesystem with overlayfs semantics."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _preload_dircache() -> None:
    """Load the optional C helper before anything imports pyfuse3.

    CPython loads extension modules with RTLD_NOW, so pyfuse3 binds
    fuse_session_new as it is imported; unionfs._dircache (see its source)
    must already be in the global symbol scope by then.  It does nothing
    until enabled, and unionfs works without it.
    """
    flags = _sys.getdlopenflags()
    _sys.setdlopenflags(flags | _os.RTLD_GLOBAL)
    try:
        from . import _dircache  # noqa: F401
    except ImportError:
        pass
    finally:
        _sys.setdlopenflags(flags)


_preload_dircache()


#: Names of the Python API (unionfs/api.py), imported on first use: ``import unionfs``
#: stays as cheap as it is for the tools that never mount.
_API = frozenset({"mounted", "mount", "Mount", "MountError"})


def __getattr__(name: str) -> object:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
