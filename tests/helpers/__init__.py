"""Test harness for pyoverlay: mounts, layer-stack builders and tree snapshots.

* ``mounts``   -- context managers for pyoverlay (CLI contract), the kernel's
                  overlayfs (the oracle), fuse-overlayfs and tmpfs.
* ``stacks``   -- compact layer specs and the named stacks used by the tests.
* ``snapshot`` -- ``snapshot(root)`` / ``diff_snapshots(a, b)``.
"""
