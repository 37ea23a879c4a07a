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
