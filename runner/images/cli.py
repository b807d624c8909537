"""``pyoverlay images``, and the image look-up behind ``mount --image`` / ``run --image``."""

from __future__ import annotations

import json
import os

import click

from overlayfs_py.errors import fail

from . import Image, ImageError


def register(main: click.Group) -> None:
    main.add_command(images_cmd)


def check_docker_root(given: str | None) -> None:
    """An explicit ``--docker-root`` must be a Docker data root (the default may be absent)."""
    if given is not None and not os.path.isdir(os.path.join(given, "image", "overlay2")):
        raise ImageError(
            f"--docker-root {given}: not a Docker data root with an overlay2 image store (no image/overlay2 in it)"
        )


def find_image(ref: str, docker: str | None = None) -> Image:
    """The image *ref* names (local store first, then Docker's); ImageError if none."""
    from . import resolve

    check_docker_root(docker)
    return resolve(ref, docker)


def human_size(n: int) -> str:
    """Docker's SIZE column: decimal units, 3 significant digits (``1.98MB``)."""
    size, units = float(n), ("B", "kB", "MB", "GB", "TB", "PB")
    i = 0
    while size >= 1000 and i < len(units) - 1:
        size /= 1000
        i += 1
    return f"{size:.3g}{units[i]}"


def image_rows(images: list[Image]) -> list[dict]:
    """One row per name (``<none>:<none>`` for an untagged image), as ``docker images``."""
    rows = []
    for img in images:
        for name in img.names or ["<none>:<none>"]:
            rows.append(
                {
                    "name": name,
                    "id": img.short_id,
                    "layers": len(img.layers),
                    "size": human_size(img.size),
                    "source": img.source,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    head = {"name": "REPOSITORY:TAG", "id": "IMAGE ID", "layers": "LAYERS", "size": "SIZE", "source": "SOURCE"}
    cols = list(head)
    width = {c: max(len(str(r[c])) for r in [head, *rows]) for c in cols}
    return "\n".join("   ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip() for r in [head, *rows])


def as_json(img: Image) -> dict:
    return {
        "id": img.id,
        "short_id": img.short_id,
        "names": img.names,
        "source": img.source,
        "size": img.size,
        "layers": img.layers,
        "diff_ids": img.diff_ids,
        "config": img.run_config(),
    }


@click.command("images")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output (one object per image).")
@click.option("-q", "--quiet", is_flag=True, help="Only image ids (12 digits).")
@click.option(
    "--docker-root",
    "given",
    metavar="DIR",
    help="Docker's data root (default $PYOVERLAY_DOCKER_ROOT or /var/lib/docker).",
)
def images_cmd(json_out, quiet, given):
    """List the images of the local store and of Docker's image store."""
    from . import sources

    try:
        check_docker_root(given)
        found: list[Image] = []
        for src in sources(given):
            found += src.list()
            for p in getattr(src, "problems", []):
                click.echo(f"pyoverlay: warning: {p}", err=True)
    except ImageError as e:
        fail(e, 1)
    if json_out:
        click.echo(json.dumps([as_json(i) for i in found], indent=1))
    elif quiet:
        for short in dict.fromkeys(i.short_id for i in found):
            click.echo(short)
    else:
        click.echo(table(image_rows(found)))
