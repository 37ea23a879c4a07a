"""The changes an upper holds over the lowers it covers, read from the upper alone.

Every layer tool (``unionfs diff``, ``export-layer``, ``apply``) starts from
the same question: what does this upper change in the merged view?  The
answer is read in time proportional to the upper: the upper is walked with
directory descriptors, and for each of its entries only the corresponding
path of the lower stack is looked up (one ``fstatat`` per lower layer that
holds the parent), through the filesystem core's own merge rules
(``unionfs.layers.LayerStack``) and marker formats (``unionfs.markers``).
The lowers' trees are never walked; the one exception is the listing of a
lower directory an opaque upper directory hides, which is what it deletes.

- ``source``: find an upper's lowers and work dir (recorded stack, a mount
  point, ``--lower``);
- ``scan``: the stream of changes, in path order with each directory's
  deletions first;
- ``diff``, ``export``, ``apply``: the subcommands built on it (``apply`` is
  also the library function the sandbox's commit calls).
"""
