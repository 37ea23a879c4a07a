"""Container images without root: the layer store and ``unionfs image``.

The API the other tools use (``unionfs run``, the layer exporter's commit)::

    from unionfs.image import Store
    store = Store.open()                  # or Store.open("/shared/store")
    img = store.image("debian:bookworm")  # StoreError if absent
    img.layers     # layer directories, top first: unionfs-mount's lower order
    img.config     # the config's Env, WorkingDir, User, Entrypoint, Cmd, ...
    img.diff_ids   # bottom first
    diff_id = store.add_layer_from_tar(fileobj)   # a new layer from a tar stream

Layers extracted without root carry their owners, modes and device numbers
as ``user.containers.override_stat`` (see ``unionfs.ownership``); a mount
presents them.  Nothing here imports pyfuse3 or trio.
"""

from .store import DEFAULT_TAG, Image, Store, StoreError, canonical, parse_ref, resolve_lowers

__all__ = [
    "DEFAULT_TAG",
    "Image",
    "Store",
    "StoreError",
    "canonical",
    "parse_ref",
    "resolve_lowers",
]
