"""The OCI image formats: one implementation of each, shared by every tool.

Layer tars are read (extracted safely into a layer directory) and written
(changesets exported from an upper) here; image layouts, manifests, configs,
digests and docker-save archives too.  Whiteout and opaque markers inside a
layer directory are the filesystem core's (``unionfs.markers``).
"""
