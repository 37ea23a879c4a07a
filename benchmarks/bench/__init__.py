"""Building blocks of the benchmark suite; ``benchmarks/run.py`` is the entry point.

layers     generates the lower layers and the merged copy (cached, deterministic)
targets    mounts native, kernel overlayfs, fuse-overlayfs, unionfs-fuse and unionfs
workloads  the timed workloads
report     medians, per-round ratios, markdown, JSON and the plot
"""
