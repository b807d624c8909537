"""The container runner (`pyoverlay run`): namespaces, rootfs, cgroups.

Empty until the runner issue; it depends on overlayfs_py, never the reverse.
"""
