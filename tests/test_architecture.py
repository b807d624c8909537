"""The import rules of docs/architecture.md, checked (no FUSE, no root).

* ``overlayfs_py`` (the filesystem) never imports ``runner`` nor the top-level command
  ``pyoverlay_cli``, not even inside a function; ``runner`` never imports
  ``pyoverlay_cli``. Checked twice: statically (every ``import`` statement of every module,
  function-level ones included, parsed with ast) and at run time (every module of
  ``overlayfs_py`` imported in a fresh interpreter, then ``sys.modules`` looked at).
* No import circle between the modules of ``overlayfs_py``, nor between those of
  ``runner`` (``runner.images`` included): the module graph of all ``import`` statements,
  function-level ones included, is acyclic but for the cycles in ALLOWED_CYCLES.
* Every error class of both packages extends ``overlayfs_py.errors.PyoverlayError``.
* ``fusermount3`` is run in one place (``overlayfs_py/unmount.py``).

The checker is tested on a small made-up package too (a circle through a function-level
import, a function-level import of ``runner``): a rule test that cannot fail is no test.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("overlayfs_py", "runner", "pyoverlay_cli")

#: Import circles that exist today and are being removed. Each entry must be an exact
#: strongly connected component of the graph; an entry that no longer exists fails the
#: test too (remove it: this list only shrinks).
ALLOWED_CYCLES: set[frozenset[str]] = set()

#: Exception classes that are not user-facing errors: an OSError that carries an errno
#: back to a FUSE reply (never printed as a message).
#: The direct engine's NeedsTask: a synchronous handler's "serve this in a task" signal.
#: The API service's control flow: AnsweredElsewhere (a child process answered the
#: request), containers._NotModified (a start that finds the container running: 304).
NOT_USER_ERRORS = {
    "overlayfs_py.workdir.Replaced",
    "overlayfs_py.fuse.ops.NeedsTask",
    "runner.api.server.AnsweredElsewhere",
    "runner.api.containers._NotModified",
}


# --- the module graph ---------------------------------------------------------------------


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of *packages* under *root*."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module *name* imports, anywhere in the file (top level, functions, classes),
    relative imports resolved; ``from P import x`` is the module ``P.x`` when that is one.
    ``importlib.import_module("...")`` and ``__import__("...")`` with a constant count too."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in known else mod)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if called in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the modules (of *packages*) it imports; an import of something inside a
    module (a class) is an edge to that module."""
    known = module_files(root, packages)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        for target in imported_names(mod, path, known):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != mod:
                graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[frozenset[str]] = set()
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.add(frozenset(comp))
    return out


def forbidden_imports(graph: dict[str, set[str]], source: str, banned: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{m} imports {t}"
        for m, ts in graph.items()
        if m.split(".")[0] == source
        for t in ts
        if t.split(".")[0] in banned
    )


def within(graph: dict[str, set[str]], pkg: str) -> dict[str, set[str]]:
    """The subgraph of the modules of *pkg*."""
    return {m: {t for t in ts if t.split(".")[0] == pkg} for m, ts in graph.items() if m.split(".")[0] == pkg}


# --- the rules ----------------------------------------------------------------------------


def test_overlayfs_py_never_imports_the_runner():
    graph = import_graph(REPO)
    assert forbidden_imports(graph, "overlayfs_py", ("runner", "pyoverlay_cli")) == []
    assert forbidden_imports(graph, "runner", ("pyoverlay_cli",)) == []


def test_importing_any_filesystem_module_loads_no_runner_module():
    """In a fresh interpreter: import every module of overlayfs_py, then look."""
    names = sorted(m for m in module_files(REPO, ("overlayfs_py",)) if not m.endswith("__main__"))
    code = (
        "import importlib, json, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('runner', 'pyoverlay_cli'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    assert len(names) > 20  # every module was tried


def test_the_filesystem_command_runs_without_the_runner():
    """``python -m overlayfs_py``: the filesystem's commands only, no runner module loaded."""
    code = (
        "import sys\nsys.argv = ['overlayfs_py', '--help']\n"
        "try:\n    import runpy; runpy.run_module('overlayfs_py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] == 'runner'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "LOADED []" in r.stdout, r.stdout + r.stderr
    listed = r.stdout.split("Commands:")[1].split()
    for cmd in ("mount", "umount", "trace", "diff", "explain"):
        assert cmd in listed
    for cmd in ("run", "ps", "images", "import", "commit"):
        assert cmd not in listed


@pytest.mark.parametrize("pkg", ["overlayfs_py", "runner"])
def test_no_import_cycles(pkg):
    found = cycles(within(import_graph(REPO), pkg))
    allowed = {c for c in ALLOWED_CYCLES if next(iter(c)).split(".")[0] == pkg}
    new = [sorted(c) for c in found - allowed]
    assert not new, f"import circles in {pkg}: {new}"
    gone = [sorted(c) for c in allowed - found]
    assert not gone, f"ALLOWED_CYCLES lists circles that no longer exist (remove them): {gone}"


def test_every_error_extends_the_one_base_class():
    from overlayfs_py.errors import PyoverlayError

    bad = []
    for mod in sorted(module_files(REPO)):
        if mod.endswith("__main__") or mod == "pyoverlay_cli":
            continue
        m = importlib.import_module(mod)
        for name, cls in vars(m).items():
            if (
                inspect.isclass(cls)
                and issubclass(cls, BaseException)
                and cls.__module__ == mod
                and f"{mod}.{name}" not in NOT_USER_ERRORS
                and not issubclass(cls, PyoverlayError)
            ):
                bad.append(f"{mod}.{name}")
    assert bad == []


def test_the_base_class_carries_message_and_exit_code():
    from overlayfs_py.config import ConfigError
    from overlayfs_py.state import StateDirError
    from runner.container import ContainerError
    from runner.spec import SpecError

    e = ConfigError("bad option")
    assert (e.message, str(e), e.exit_code) == ("bad option", "bad option", 2)
    s = StateDirError("not yours")
    assert isinstance(s, OSError) and (str(s), s.exit_code) == ("not yours", 1)
    assert SpecError("x").exit_code == 125  # the runner's own errors: 125
    c = ContainerError("not found", exit_code=127)
    assert (c.exit_code, c.message) == (127, "not found")


def test_fusermount3_is_run_in_one_place():
    """Only overlayfs_py/unmount.py spells a ``fusermount3 -u`` command line, or looks the
    tool up to run it (mentions in comments and docstrings, ``fusermount3 --version`` and
    the privilege checks of the binary are fine; ``umount`` of a kernel overlay is too)."""
    offenders = []
    for top in ("overlayfs_py", "runner", "pyoverlay_cli", "scripts", "tests/helpers"):
        for path in sorted((REPO / top).rglob("*.py")):
            if path.name == "unmount.py" and path.parent.name == "overlayfs_py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                words = [e.value for e in getattr(node, "elts", []) if isinstance(e, ast.Constant)]
                if (
                    isinstance(node, ast.List)
                    and "fusermount3" in words
                    and any(isinstance(w, str) and w.startswith("-u") for w in words)
                ):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


# --- the checker can fail -----------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_checker_finds_function_level_circles_and_imports(tmp_path):
    _write(
        tmp_path,
        {
            "overlayfs_py/__init__.py": "",
            "overlayfs_py/a.py": "from . import b\n",
            "overlayfs_py/b.py": "def f():\n    from .c import X\n",
            "overlayfs_py/c.py": "def g():\n    import overlayfs_py.a\n    from runner import state\n",
            "overlayfs_py/d.py": "import importlib\nimportlib.import_module('runner.cli')\n",
            "overlayfs_py/e.py": "from .a import *\n",
            "runner/__init__.py": "",
            "runner/state.py": "from overlayfs_py import a\n",
            "runner/cli.py": "",
        },
    )
    graph = import_graph(tmp_path, ("overlayfs_py", "runner"))
    assert graph["overlayfs_py.b"] == {"overlayfs_py.c"}
    assert cycles(within(graph, "overlayfs_py")) == {frozenset({"overlayfs_py.a", "overlayfs_py.b", "overlayfs_py.c"})}
    assert cycles(within(graph, "runner")) == set()
    assert forbidden_imports(graph, "overlayfs_py", ("runner",)) == [
        "overlayfs_py.c imports runner.state",
        "overlayfs_py.d imports runner.cli",
    ]
    assert forbidden_imports(graph, "runner", ("pyoverlay_cli",)) == []


def test_the_module_list_is_complete():
    names = set(module_files(REPO))
    for pkg in ("overlayfs_py", "runner"):
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            assert info.name in names
    assert {"overlayfs_py.cli", "runner.images.core", "pyoverlay_cli"} <= names
    assert os.path.basename(module_files(REPO)["runner.images"]) == "__init__.py"


# --- configuration is pure; the plan decides the xattr namespace once ---------------------


def test_parsing_reads_no_record_and_asks_no_privilege(tmp_path):
    """build_config only parses and validates: a damaged workdir record is the planning
    step's business (userxattr.plan), and an undecided namespace stays undecided."""
    from overlayfs_py import userxattr
    from overlayfs_py.config import ConfigError, build_config

    for d in ("lo", "up", "wk", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "wk" / userxattr.RECORD).write_text('{"userxattr": "yes"}')
    cfg = build_config(str(tmp_path / "lo"), str(tmp_path / "up"), str(tmp_path / "mnt"), workdir=str(tmp_path / "wk"))
    assert cfg.userxattr is None
    with pytest.raises(ConfigError, match="bad userxattr record"):
        userxattr.plan(cfg)
    (tmp_path / "wk" / userxattr.RECORD).write_text('{"userxattr": true}')
    assert userxattr.plan(cfg).userxattr is True
    config_imports = import_graph(REPO)["overlayfs_py.config"]
    assert not config_imports & {"overlayfs_py.privilege", "overlayfs_py.userxattr", "overlayfs_py.diff"}


def test_the_filesystem_command_refuses_image_in_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "overlayfs_py", "mount", "--image", "busybox", str(tmp_path / "m")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr == "pyoverlay: --image needs the image store: use the pyoverlay command\n"
