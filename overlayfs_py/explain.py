"""Why a path in a merged view looks the way it does, from the layer directories alone.

Pure: it never touches a mount. Given the layers (an upper or None, the lowers top
first, with labels) and a path, :func:`explain` walks the path one component at a time
in every layer (through :class:`~overlayfs_py.layers.LayerStack`: ``openat2`` beneath
the layer root, no symlink followed) and applies the kernel's precedence: a whiteout
ends the walk, a non-directory is the answer and hides what is below it, directories
merge until an opaque one. The result says which layer serves the path (or why it
does not exist), and for every other layer that has something at that path, why it
is not seen:

* ``higher``: a higher layer has something at the same path that wins over it;
* ``whiteout``: a whiteout at the path, or at an ancestor, in a higher layer;
* ``opaque``: an opaque directory at the path, or at an ancestor, in a higher layer;
* ``nondir``: a non-directory at an ancestor in a higher layer (nothing merges below it).

Each hidden object names the *nearest* higher layer that hides it (the one that would
hide it if the layers above were gone), so a chain reads top-down.

With *aufs* (``-o aufs_whiteouts=on`` mounts: their record says so), an AUFS marker
``.wh.NAME`` in a layer is that layer's whiteout of NAME (named in the answer by its own
path) and ``.wh..wh..opq`` makes its directory opaque, as the mount sees them.

Redirects (``overlay.redirect``) are not followed: every layer is looked at under the
same path, and a note says so when a directory on the way carries one: it was renamed by
redirect (``redirect_dir=on``), and the note names the lower path its content comes from
and the lower layers that have a directory there.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from . import _sys
from .layers import Layer, LayerStack
from .whiteout import (
    TRUSTED_PREFIX,
    USER_PREFIX,
    XattrNames,
    aufs_marker_for,
    aufs_opaque_at,
    aufs_whiteout_at,
    is_aufs_marker,
    is_opaque,
    is_whiteout_at,
    opaque_value,
)

#: how a hidden object is hidden (see the module docstring)
HOW = ("higher", "whiteout", "opaque", "nondir")


@dataclass
class LayerObject:
    """What one layer has at the path, and its part in the merged view.

    *role*: ``serves`` (the merged object), ``merges`` (a lower part of a merged
    directory), ``whiteout`` (the whiteout that makes the path not exist) or ``hidden``
    (then *hidden_by* is a layer label, *how* one of :data:`HOW`, *at* the merged path
    of the hiding object: the path itself or an ancestor).
    """

    label: str
    real_path: str
    kind: str  # file dir symlink whiteout fifo socket chardev blockdev
    size: int | None = None
    target: str | None = None  # symlink
    rdev: str | None = None  # devices, "major:minor"
    opaque: bool = False
    xattr_whiteout: bool = False
    aufs_marker: bool = False  # the whiteout is an AUFS marker ``.wh.NAME`` (real_path is the marker's)
    origin: bool = False  # carries an overlay.origin record (it was copied up)
    metacopy: bool = False  # a metacopy file (overlay.metacopy): its data is in a layer below
    role: str = "hidden"
    hidden_by: str | None = None
    how: str | None = None
    at: str | None = None


@dataclass
class Explanation:
    """:func:`explain`'s answer. *served* is the layer object seen through the mount
    (None when the path does not exist: then *missing* says why, as
    ``{"how": "whiteout"|"nondir"|"opaque"|"absent", "at": path, "layer": label, ...}``)."""

    path: str
    exists: bool
    served: LayerObject | None
    missing: dict | None
    copied_up: bool = False
    copied_up_from: str | None = None
    merges: list[str] = field(default_factory=list)  # directories: contributing layers, top first
    # a metacopy file (metacopy=on): the layer whose file still holds its data, and that file
    data_from: str | None = None
    data_path: str | None = None
    layers: list[LayerObject] = field(default_factory=list)  # every layer with an object, top first
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def explain(
    upper: str | None,
    lowers: Sequence[str],
    path: str,
    *,
    labels: Sequence[str] | None = None,
    userxattr: bool = False,
    aufs: bool = False,
    index: str | None = None,
) -> Explanation:
    """Explain *path* (a path in the merged view; "/" is the root) over these layers.

    *labels* name the layers, upper first when there is one (default: ``upper``,
    ``lower1``, ``lower2``, ...). *aufs*: honour AUFS ``.wh.`` markers (a mount with
    ``-o aufs_whiteouts=on``). *index*: the mount's ``<workdir>/index`` (``index=on``): a
    note says when the file's copy is shared through it with other names (index.py).
    """
    names = XattrNames(USER_PREFIX if userxattr else TRUSTED_PREFIX)
    stack = LayerStack(tuple(lowers), upper, names, aufs=aufs)
    try:
        if labels is not None:
            if len(labels) != len(stack.layers):
                raise ValueError(f"{len(labels)} labels for {len(stack.layers)} layers")
            for layer, label in zip(stack.layers, labels, strict=True):
                layer.label = label
        ex = _Explainer(stack, names).run(normalize(path))
        if ex.served is not None and ex.served.kind != "dir" and path.strip("/"):
            _index_note(stack, names, ex, normalize(path), index)
        return ex
    finally:
        stack.close()


def _index_note(stack: LayerStack, names: XattrNames, ex: Explanation, path: str, index: str | None) -> None:
    """index=on: an upper file linked from the index (its copy is shared by the names of a
    lower hard-link set), or a lower name whose index entry serves it through the mount."""
    from .index import encode_fh, index_name

    served = ex.served
    assert served is not None
    layer = next((x for x in stack.layers if x.label == served.label), None)
    if layer is None:
        return
    rel = os.fsencode(path.strip("/"))
    try:
        fd = _sys.open_beneath(layer.fd, rel, _sys.O_PATH)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if layer.is_upper:
            raw = _sys.getxattr_at(fd, None, names.nlink)
            origin = _sys.getxattr_at(fd, None, names.origin)
            if raw is not None and origin is not None:
                ex.notes.append(
                    f"{path} is an indexed copy (index=on): its upper file is also index/"
                    f"{os.fsdecode(index_name(origin))} in the workdir, and every name of its lower hard-link"
                    f" set shows this copy, linked up or not (overlay.nlink {os.fsdecode(raw)})"
                )
        elif index is not None and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            rec = encode_fh(fd, stack.fs_uuid(layer))
            if rec is None:
                return
            name = index_name(rec)
            try:
                os.lstat(os.path.join(os.fsencode(index), name))
            except OSError:
                return
            ex.notes.append(
                f"{path} is served by index/{os.fsdecode(name)} in the workdir (index=on): another name of"
                f" its lower hard-link set was copied up, and the mount shows that copy here too (this"
                f" {served.label} file shows only with index=off)"
            )
    finally:
        os.close(fd)


def normalize(path: str) -> str:
    """The merged path as "/a/b" (".." taken lexically: nothing is resolved)."""
    return posixpath.normpath("/" + path.lstrip("/")) if path.strip("/") else "/"


class _Explainer:
    def __init__(self, stack: LayerStack, names: XattrNames) -> None:
        self.stack = stack
        self.names = names
        self.notes: list[str] = []

    def run(self, path: str) -> Explanation:
        layers = self.stack.layers
        roots = [self._root_object(layer) for layer in layers]
        live: list[Layer] = []
        for i, (layer, obj) in enumerate(zip(layers, roots, strict=True)):
            live.append(layer)
            if i < len(layers) - 1 and obj.opaque:
                break
        cut = {layer.index: ("opaque", live[-1].label, "/") for layer in layers if layer not in live}
        comps = [os.fsencode(c) for c in path.split("/") if c]
        if not comps:
            return self._root(roots, live, cut)
        missing = None
        for i in range(len(comps)):
            rel = b"/".join(comps[: i + 1])
            at = "/" + os.fsdecode(rel)
            found, served, merging = self._level(live, cut, rel, at)
            seen = [o for _, o in found]
            if i == len(comps) - 1:
                return self._answer(path, seen, served, merging, missing)
            if missing is None and (served is None or served.kind != "dir"):
                missing = self._missing(seen, served, at)
            live = [layer for layer, o in found if any(o is m for m in merging)]
            for layer, obj in found:  # a directory not merged here hides nothing further down
                if obj.kind == "dir" and layer not in live and layer.index not in cut:
                    cut[layer.index] = ("nondir" if obj.how == "higher" else obj.how, obj.hidden_by, obj.at)
        raise AssertionError("unreachable")

    # --- one level ------------------------------------------------------------------------

    def _level(self, live: list[Layer], cut: dict, rel: bytes, at: str):
        """Classify what every layer has at *rel*: ([(layer, object)] top first, the served
        object, the merging directories)."""
        found: list[tuple[Layer, LayerObject]] = []
        merging: list[LayerObject] = []
        served: LayerObject | None = None
        prev: LayerObject | None = None
        stopped = False
        for layer in self.stack.layers:
            obj = self._object(layer, rel)
            if obj is None:
                continue
            found.append((layer, obj))
            redirect = self._xattr(layer, rel, self.names.redirect) if obj.kind == "dir" else None
            if redirect is not None:
                self.notes.append(self._redirect_note(layer, rel, at, redirect))
            if layer not in live:
                obj.how, obj.hidden_by, obj.at = cut.get(layer.index, ("higher", None, at))
                continue
            if stopped or (merging and obj.kind != "dir"):
                assert prev is not None  # the walk was stopped, or the merge started, by a higher object
                stopped = True
                self._hide(obj, prev, at)
            elif obj.kind == "whiteout":
                stopped = True
                obj.role = "whiteout"
            elif obj.kind != "dir":
                stopped = True
                obj.role, served = "serves", obj
            else:
                obj.role = "merges" if merging else "serves"
                served = served or obj
                merging.append(obj)
                stopped = obj.opaque and layer is not self.stack.layers[-1]
            prev = obj
        return found, served, merging

    def _redirect_note(self, layer: Layer, rel: bytes, at: str, redirect: bytes) -> str:
        """The note for a directory with ``overlay.redirect``: it was renamed by redirect
        (a mount with redirect_dir=on wrote it), and where its lower content comes from."""
        if redirect.startswith(b"/"):
            target = redirect.strip(b"/")
        else:
            parent = rel.rpartition(b"/")[0]
            target = parent + b"/" + redirect if parent else redirect
        below = self.stack.layers[self.stack.layers.index(layer) + 1 :]
        try:
            has = [x.label for x in below if (o := self._object(x, target)) is not None and o.kind == "dir"]
        except OSError:
            has = []
        source = "/" + os.fsdecode(target)
        where = f"{', '.join(has)} {'has' if len(has) == 1 else 'have'} it" if has else "no lower layer has it"
        return (
            f"{at} in {layer.label} has a redirect ({os.fsdecode(redirect)!r}); it was renamed by redirect"
            f" (redirect_dir=on): the mount merges into it the lower directories at {source} ({where});"
            " redirects are not followed here: the layers below are shown at the same path"
        )

    @staticmethod
    def _hide(obj: LayerObject, prev: LayerObject, at: str) -> None:
        """*obj* is hidden: name the nearest higher object that hides it."""
        if prev.kind == "whiteout":
            obj.how, obj.hidden_by, obj.at = "whiteout", prev.label, at
        elif prev.kind == "dir" and obj.kind == "dir" and prev.opaque:
            obj.how, obj.hidden_by, obj.at = "opaque", prev.label, at
        elif prev.kind == "dir" and obj.kind == "dir" and prev.how is not None:
            obj.how, obj.hidden_by, obj.at = prev.how, prev.hidden_by, prev.at  # both hidden alike
        else:
            obj.how, obj.hidden_by, obj.at = "higher", prev.label, at

    # --- the answer -----------------------------------------------------------------------

    def _root(self, roots, live, cut) -> Explanation:
        for layer, obj in zip(self.stack.layers, roots, strict=True):
            if layer in live:
                obj.role = "serves" if layer is live[0] else "merges"
            else:
                obj.how, obj.hidden_by, obj.at = cut[layer.index]
        merging = [o for o in roots if o.role != "hidden"]
        return self._answer("/", roots, roots[0], merging, None)

    def _answer(self, path, seen, served, merging, missing) -> Explanation:
        if missing is None and served is None:
            missing = self._missing(seen, None, path)
        if missing is not None:
            return Explanation(path, False, None, missing, layers=seen, notes=self.notes)
        ex = Explanation(path, True, served, None, layers=seen, notes=self.notes)
        if served.kind == "dir":
            ex.merges = [o.label for o in merging]
        upper = self.stack.upper
        if upper is not None and served.label == upper.label and path != "/":
            ex.copied_up_from = self._copied_from(seen, served, merging)
            ex.copied_up = served.origin or ex.copied_up_from is not None
        if served.metacopy:
            self._data_note(ex, os.fsencode(path.lstrip("/")))
        return ex

    @staticmethod
    def _copied_from(seen, served, merging) -> str | None:
        """The lower object this upper one was copied from: the first lower part of a merged
        directory, or a same-type object hidden directly by it (not cut off above)."""
        if served.kind == "dir":
            return merging[1].label if len(merging) > 1 else None
        below = next((o for o in seen if o is not served), None)
        if (
            below is not None
            and below.how == "higher"
            and below.hidden_by == served.label
            and below.kind == served.kind
        ):
            return below.label
        return None

    def _missing(self, seen, served, at) -> dict:
        """Why nothing is served at *at*: a non-directory where a directory is needed, a
        whiteout, an opaque directory above every layer that has it, or no layer has it."""
        if served is not None:
            return {
                "how": "nondir",
                "at": at,
                "layer": served.label,
                "real_path": served.real_path,
                "kind": served.kind,
            }
        for o in seen:
            if o.role == "whiteout":
                out = {"how": "whiteout", "at": at, "layer": o.label, "real_path": o.real_path}
                if o.aufs_marker:
                    out["marker"] = True
                return out
        if seen and seen[0].how == "opaque":  # every layer that has it is cut off above
            layer = next(lay for lay in self.stack.layers if lay.label == seen[0].hidden_by)
            real = os.path.join(layer.path, seen[0].at.lstrip("/")) if seen[0].at != "/" else layer.path
            return {"how": "opaque", "at": seen[0].at, "layer": layer.label, "real_path": real}
        return {"how": "absent", "at": at}

    # --- reading a layer ------------------------------------------------------------------

    def _root_object(self, layer: Layer) -> LayerObject:
        """What *layer* has at its root: always a directory (the layer's open fd)."""
        obj = self._object(layer, b"")
        if obj is None:  # only a failed lookup below the root gives None
            raise AssertionError(f"layer root {layer.path} vanished")
        return obj

    def _object(self, layer: Layer, rel: bytes) -> LayerObject | None:
        """What *layer* has at *rel* (lstat; None when nothing, or a component on the way is
        not a directory: symlinks in a layer are never followed)."""
        real = os.path.join(layer.path, os.fsdecode(rel)) if rel else layer.path
        parent, _, name = rel.rpartition(b"/")
        if self.stack.aufs and rel:
            if is_aufs_marker(name):
                note = f"{os.fsdecode(name)} is an AUFS whiteout marker's name: the mount never shows it"
                if note not in self.notes:
                    self.notes.append(note)
                return None
            marker = self._aufs_marker(layer, parent, name)
            if marker is not None:
                return marker
        try:
            if not rel:
                st, dfd = os.fstat(layer.fd), None
            else:
                dfd = self.stack.dir_fd(layer, parent)
                st = _sys.lstat_at(dfd, name)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                return None
            raise
        obj = LayerObject(layer.label, real, _kind(st))
        if dfd is not None and obj.kind in ("chardev", "file") and is_whiteout_at(dfd, name, st, self.names):
            obj.xattr_whiteout = obj.kind == "file"
            obj.kind = "whiteout"
        elif obj.kind == "file":
            obj.size = st.st_size
        elif obj.kind == "symlink" and dfd is not None:  # a layer root is a directory
            obj.target = os.fsdecode(_sys.readlink_at(dfd, name))
        elif obj.kind in ("chardev", "blockdev"):
            obj.rdev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        elif obj.kind == "dir":
            obj.opaque = is_opaque(
                opaque_value(layer.fd, None, self.names) if dfd is None else opaque_value(dfd, name, self.names)
            ) or (self.stack.aufs and aufs_opaque_at(layer.fd if dfd is None else dfd, None if dfd is None else name))
        if layer.is_upper and obj.kind != "whiteout":
            obj.origin = self._xattr(layer, rel, self.names.origin) is not None
        if obj.kind == "file" and dfd is not None:
            obj.metacopy = self._xattr(layer, rel, self.names.metacopy) is not None
        return obj

    def _data_note(self, ex: Explanation, rel: bytes) -> None:
        """A served metacopy file: where its data comes from (the kernel's lookup of its
        data file: below its layer, at the path its own redirect names, past further
        metacopy files; redirects of directories above are not followed here)."""
        served = ex.served
        assert served is not None
        layer = next(lay for lay in self.stack.layers if lay.label == served.label)
        parent, _, name = rel.rpartition(b"/")
        rest = [(low, rel) for low in self.stack.layers if low.index > layer.index]
        self.stack.metacopy = True
        try:
            hit = self.stack._lowerdata(rest, layer, self.stack.dir_fd(layer, parent), name)
        except OSError as exc:
            ex.notes.append(
                f"{ex.path} is a metacopy file, but its data file is not found below {layer.label} "
                f"({os.strerror(exc.errno or errno.EIO)}): the mount fails to look it up"
            )
            return
        ex.data_from = hit.layer.label
        ex.data_path = os.path.join(hit.layer.path, os.fsdecode(hit.path))
        ex.notes.append(
            f"{ex.path} is a metacopy file (metacopy=on copied up its metadata only): its data still comes "
            f"from {hit.layer.label} ({ex.data_path}) until it is opened for writing or truncated"
        )

    def _aufs_marker(self, layer: Layer, parent: bytes, name: bytes) -> LayerObject | None:
        """The AUFS marker ``.wh.NAME`` in *layer*'s directory *parent*, as a whiteout object
        (it hides NAME in this layer too, as fuse-overlayfs's lookup does)."""
        try:
            if not aufs_whiteout_at(self.stack.dir_fd(layer, parent), name):
                return None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                return None
            raise
        mrel = (parent + b"/" if parent else b"") + aufs_marker_for(name)
        return LayerObject(layer.label, os.path.join(layer.path, os.fsdecode(mrel)), "whiteout", aufs_marker=True)

    def _xattr(self, layer: Layer, rel: bytes, attr: str) -> bytes | None:
        if not rel:
            return _sys.getxattr_at(layer.fd, None, attr)
        parent, _, name = rel.rpartition(b"/")
        return _sys.getxattr_at(self.stack.dir_fd(layer, parent), name, attr)


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    for test, kind in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "chardev"),
        (stat.S_ISBLK, "blockdev"),
    ):
        if test(m):
            return kind
    return "unknown"


# --- human output -----------------------------------------------------------------------


def describe(obj: LayerObject) -> str:
    """ "regular file, 42 bytes", "directory (opaque)", "symlink -> /bin/busybox", ..."""
    if obj.kind == "file":
        return f"regular file, {obj.size} byte{'' if obj.size == 1 else 's'}"
    if obj.kind == "dir":
        return "directory (opaque)" if obj.opaque else "directory"
    if obj.kind == "symlink":
        return f"symlink -> {obj.target}"
    if obj.kind == "whiteout":
        if obj.aufs_marker:
            return "whiteout (AUFS marker " + os.path.basename(obj.real_path) + ")"
        return "whiteout (xattr)" if obj.xattr_whiteout else "whiteout"
    if obj.kind in ("chardev", "blockdev"):
        return f"{'char' if obj.kind == 'chardev' else 'block'} device {obj.rdev}"
    return obj.kind


def _hidden_phrase(obj: LayerObject, path: str) -> str:
    here = obj.at == path
    if obj.how == "whiteout":
        return (
            f"hidden by the whiteout in {obj.hidden_by}"
            if here
            else f"hidden by the whiteout at {obj.at} in {obj.hidden_by}"
        )
    if obj.how == "opaque":
        return (
            f"hidden by the opaque directory in {obj.hidden_by}"
            if here
            else f"hidden by the opaque directory {obj.at} in {obj.hidden_by}"
        )
    if obj.how == "nondir":
        return f"hidden by the non-directory at {obj.at} in {obj.hidden_by}"
    return f"hidden by {obj.hidden_by}"


_KIND_NAMES = {
    "file": "a regular file",
    "symlink": "a symlink",
    "fifo": "a fifo",
    "socket": "a socket",
    "chardev": "a char device",
    "blockdev": "a block device",
}


def format_text(ex: Explanation) -> str:
    """The human form: a headline, then one indented line per other layer, then notes."""
    s = ex.served
    if s is not None:  # ex.exists
        head = f"{ex.path}: served by {s.label} ({s.real_path}), {describe(s)}"
        extra = []
        if ex.copied_up:
            extra.append(f"copied up from {ex.copied_up_from}" if ex.copied_up_from else "copied up")
        if len(ex.merges) > 1:
            extra.append("merges " + ", ".join(ex.merges))
        if ex.data_from:
            extra.append(f"data from {ex.data_from}")
        if extra:
            head += " — " + "; ".join(extra)
    else:
        m = ex.missing or {"how": "absent", "at": ex.path}
        if m["how"] == "whiteout":
            where = "" if m["at"] == ex.path else f" at {m['at']}"
            kind = "AUFS whiteout " + os.path.basename(m["real_path"]) if m.get("marker") else "whiteout"
            head = f"{ex.path}: does not exist — {kind}{where} in {m['layer']} ({m['real_path']})"
        elif m["how"] == "nondir":
            what = _KIND_NAMES.get(m["kind"], m["kind"])
            head = (
                f"{ex.path}: does not exist — {m['at']} is {what} in {m['layer']} ({m['real_path']}), not a directory"
            )
        elif m["how"] == "opaque":
            head = (
                f"{ex.path}: does not exist — hidden by the opaque directory {m['at']} in {m['layer']} "
                f"({m['real_path']})"
            )
        else:
            head = f"{ex.path}: does not exist — no layer has " + ("it" if m["at"] == ex.path else m["at"])
    lines = [head]
    for o in ex.layers:
        if o is ex.served or o.role == "whiteout":
            continue  # the headline is about it
        state = "merged" if o.role == "merges" else "whiteout" if o.role == "whiteout" else _hidden_phrase(o, ex.path)
        lines.append(f"  {o.label} ({o.real_path}): {describe(o)}, {state}")
    lines += [f"  note: {n}" for n in ex.notes]
    return "\n".join(lines)
