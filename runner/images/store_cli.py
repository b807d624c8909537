"""``pyoverlay import`` and ``pyoverlay commit``: the commands that write the local store.

Both print what they made on stdout (``<image id> <name>...`` per image) and progress
on stderr; errors are one line, ``pyoverlay: <message>``, exit status 1. Ctrl-C (or a
kill) leaves the store as it was: see :mod:`runner.images.local`.
"""

from __future__ import annotations

import sys

import click

from overlayfs_py.errors import fail

from . import Image, ImageError, local_root
from .archive import open_archive
from .local import LocalStore


def register(main: click.Group) -> None:
    main.add_command(import_cmd)
    main.add_command(commit_cmd)


def import_archive(path: str, store: LocalStore, tag: str | None = None, log=None) -> list[Image]:
    """Import every image of the archive (or layout directory) *path*; a layer whose diff
    id is in the store already is neither read nor unpacked again. Layers are read in the
    order the archive stores them (a compressed archive is read once, front to back)."""
    from .commit import new_name

    log = log or (lambda msg: print(msg, file=sys.stderr))
    names = [new_name(tag)] if tag else None
    out = []
    with store.writer() as w, open_archive(path, w.tmp) as ar:
        found = ar.images()
        if not found:
            raise ImageError(f"{path}: no images in it")
        if names and len(found) > 1:
            raise ImageError(f"{path} holds {len(found)} images; --tag needs exactly one")
        refs: dict[str, list[tuple[int, int]]] = {}  # layer path -> (image, layer) using it
        for i, img in enumerate(found):
            for j, layer in enumerate(img.layers):
                refs.setdefault(layer.path, []).append((i, j))
        descs: dict[tuple[int, int], tuple[dict, bool]] = {}

        def add(i: int, j: int, f, size: int | None) -> None:
            img, layer = found[i], found[i].layers[j]
            label = f"{img.id[7:19]} layer {j + 1}/{len(img.layers)}"
            descs[i, j] = w.add_layer(
                f,
                diff_id=layer.diff_id,
                digest=layer.digest,
                media_type=layer.media_type,
                size=layer.size or size,
                label=label,
            )

        todo = []
        for rel, users in refs.items():  # a layer already stored is not read at all
            for i, j in users:
                if not w.needs_read(found[i].layers[j].diff_id, found[i].layers[j].digest):
                    add(i, j, None, None)
            if any((i, j) not in descs for i, j in users):
                todo.append(rel)
        for rel, f, size in ar.layers(todo):
            for i, j in refs[rel]:
                if (i, j) not in descs:
                    add(i, j, f, size)
        for i, img in enumerate(found):
            layer_descs = []
            for j, layer in enumerate(img.layers):
                desc, fresh = descs[i, j]
                log(
                    f"{img.id[7:19]} layer {j + 1}/{len(img.layers)}: {layer.diff_id} "
                    f"({'unpacked' if fresh else 'already present'})"
                )
                layer_descs.append(desc)
            same_blobs = [d["digest"] for d in layer_descs] == [layer.digest for layer in img.layers]
            out.append(w.add_image(img.config, layer_descs, names or img.names, img.manifest if same_blobs else None))
    return out


@click.command("import")
@click.argument("archive", metavar="ARCHIVE|DIR")
@click.option(
    "--tag",
    "-t",
    metavar="NAME:TAG",
    help="Store the (single) image under this name instead of the names in the archive.",
)
def import_cmd(archive, tag):
    """Import the images of a `docker save` archive or an OCI image layout (a tar file,
    possibly gzip'd, or a directory) into the local image store."""
    try:
        for img in import_archive(archive, LocalStore(local_root()), tag):
            click.echo(" ".join([img.id, *img.names]))
    except (ImageError, OSError) as e:
        fail(e, 1)
    except KeyboardInterrupt:
        fail("interrupted; nothing was imported", 130)


@click.command("commit")
@click.argument("target", metavar="UPPER|CONTAINER")
@click.option("-o", "--output", metavar="FILE", help="Write the upper layer as an OCI layer tar (- for stdout).")
@click.option("--image", "image", metavar="NAME[:TAG]", help="Store a new image: the parent plus this layer.")
@click.option("--parent", metavar="REF", help="The parent image (default: the container's image, if any).")
@click.option("--docker-root", metavar="DIR", help="Docker's data root, to find --parent there.")
def commit_cmd(target, output, image, parent, docker_root):
    """Turn an upper layer (a directory, or a container's) into a layer tar and/or an image."""
    from . import commit

    if not output and not image:
        fail("nothing to do: give -o FILE and/or --image NAME[:TAG]", 2)
    try:
        upper, rec = commit.find_upper(target)
        if output:
            diff_id, size = commit.write_tar(upper, output, rec)
            click.echo(f"{output}: {diff_id} ({size} bytes)", err=True)
        if image:
            name = commit.new_name(image)
            base = _parent(parent, rec, docker_root)
            img = commit.commit_image(upper, rec, name, base, LocalStore(local_root()))
            click.echo(" ".join([img.id, *img.names]))
    except (ImageError, OSError) as e:
        fail(e, 1)
    except KeyboardInterrupt:
        fail("interrupted; nothing was stored", 130)


def _parent(ref: str | None, rec: dict | None, docker_root: str | None) -> Image | None:
    from . import resolve

    if ref is None and rec and rec.get("image"):
        ref = rec["image"].get("id")
    return resolve(ref, docker_root) if ref else None
