"""The layers of the tree, enforced: a module that reaches where its layer
must not fails the build.

* ``pccl/master`` (the ``pccl-master`` daemon: state machine, election,
  server) imports neither the native extension nor the test harness: it
  runs where no C core was built and must not depend on test code.
* Nothing in ``pccl/`` outside ``pccl/testing`` imports ``pccl.testing``.
* ``native/src/coll`` (the algorithms) includes no socket, thread or
  connection header: it sees frames, the engine owns sockets and threads.

Python imports are read with :mod:`ast` (function-level imports, relative
imports and ``importlib.import_module("...")`` with a literal included),
from the source tree, not the installed package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pccl"

NATIVE_MODULES = ("pccl._native", "pccl._pccl_native")
TESTING = "pccl.testing"
COLL_FORBIDDEN = (
    "net/conn.h",
    "net/link.h",
    "net/listener.h",
    "platform/",  # any header of the platform layer (threads, sockets, clocks)
    "sys/socket.h",
    "pthread.h",
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the text of ``module``) may import: absolute
    names, relative ones resolved, ``from X import y`` giving both ``X`` and
    ``X.y`` (y may be a submodule), wherever the statement is."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                if node.module:
                    base = f"{base}.{node.module}"
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add(node.args[0].value)
    return found


def reaches(found: set[str], forbidden: str) -> bool:
    return any(m == forbidden or m.startswith(forbidden + ".") for m in found)


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in files:
        mod = module_name(path)
        found = imported_modules(path.read_text(), mod, path.name == "__init__.py")
        for f in forbidden:
            if reaches(found, f):
                out.append(f"{path.relative_to(ROOT)} imports {f}")
    return out


def python_files(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if "__pycache__" not in p.parts)


# --------------------------------------------------------------------------
# The checker itself, on sources whose answer is known (so the rules below
# cannot pass because the checker sees nothing).


def test_checker_sees_every_form_of_import():
    src = (
        "import pccl._native\n"
        "from .. import _native as n\n"
        "from ..testing.procs import MasterProcess\n"
        "def f():\n"
        "    from pccl import testing\n"
        "    import importlib\n"
        "    importlib.import_module('pccl._pccl_native')\n"
    )
    found = imported_modules(src, "pccl.master.server")
    assert reaches(found, "pccl._native")
    assert reaches(found, "pccl._pccl_native")
    assert reaches(found, "pccl.testing")
    assert "pccl.testing.procs" in found
    assert not reaches(imported_modules("from .. import _wire\n", "pccl.master.x"), "pccl._native")
    # Relative imports from a package's __init__ resolve against the package.
    assert "pccl.master.sync" in imported_modules("from . import sync\n", "pccl.master", True)
    assert not reaches({"pccl.testingx"}, "pccl.testing")


def test_checker_sees_the_includes():
    src = '#include <stdint.h>\n  #  include "net/conn.h"\n#include <pthread.h>\n'
    assert forbidden_includes(src) == ["net/conn.h", "pthread.h"]
    assert forbidden_includes('#include "net/frame.h"\n#include "pccl.h"\n') == []


# --------------------------------------------------------------------------
# The rules.


def test_master_imports_neither_the_native_extension_nor_the_harness():
    files = python_files(PKG / "master")
    assert files, "pccl/master has no Python files?"
    assert violations(files, (*NATIVE_MODULES, TESTING)) == []


def test_only_the_harness_imports_the_harness():
    files = [p for p in python_files(PKG) if "testing" not in p.relative_to(PKG).parts[:1]]
    assert len(files) > 5
    assert violations(files, (TESTING,)) == []


_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)


def forbidden_includes(source: str) -> list[str]:
    out = []
    for inc in _INCLUDE.findall(source):
        norm = inc
        while norm.startswith("../"):
            norm = norm[3:]
        if any(norm == f or (f.endswith("/") and norm.startswith(f)) for f in COLL_FORBIDDEN):
            out.append(inc)
    return out


@pytest.mark.xfail(strict=True, reason="native refactor branch not merged")
def test_collectives_include_no_socket_thread_or_connection_header():
    coll = ROOT / "native" / "src" / "coll"
    files = sorted([*coll.glob("*.c"), *coll.glob("*.h")])
    assert files, "native/src/coll has no sources?"
    bad = [
        f"{p.relative_to(ROOT)}: {inc}" for p in files for inc in forbidden_includes(p.read_text())
    ]
    assert bad == []
