"""unionfs: a rootless userspace union filesystem with overlayfs semantics."""

__version__ = "0.1.0"
