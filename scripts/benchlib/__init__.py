"""The pyoverlay benchmark harness (``scripts/bench``): layers, implementations,
workloads, the round-robin runner, reports and the ``--memwalk`` mode.

See docs/performance.md for the method and the latest results.
"""
