#!/usr/bin/env python3
"""Print the include graph and the cross-file call graph of the native core.

    python3 tools/include_graph.py [--dir native/src/core] [--dot]

Include graph: one edge per ``#include "..."`` between files of the
directory (paths are resolved against native/src, as the build does).
Call graph: one edge ``a.c -> b.c`` when a.c calls (or takes the address
of) a function defined in b.c; definitions are found the way the tree
writes them (return type on its own line, the name at column 0).  Exits 1
when either graph has a cycle (the cycle is printed), and when a file of
native/src/coll includes a socket, thread or connection header (the
algorithms must see only the frame codec and the operation interface).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "native" / "src"
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
INCLUDE_ANY = re.compile(r'^\s*#\s*include\s+[<"]([^>"]+)[>"]', re.M)
DEFINITION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\(", re.M)
IDENT = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\b")
COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
STRING = re.compile(r'"(?:\\.|[^"\\])*"')
FORBIDDEN_IN_COLL = ("net/conn.h", "net/link.h", "net/listener.h", "sys/socket.h", "pthread.h")


def strip(text: str) -> str:
    return STRING.sub('""', COMMENT.sub(" ", text))


def find_cycle(nodes: list[str], edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)) is not None:
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in nodes:
        if n not in state and (found := visit(n)) is not None:
            return found
    return None


def include_graph(files: list[Path]) -> dict[str, set[str]]:
    names = {str(f.relative_to(SRC)) for f in files}
    edges: dict[str, set[str]] = {}
    for f in files:
        me = str(f.relative_to(SRC))
        for inc in INCLUDE.findall(f.read_text()):
            if inc in names and inc != me:
                edges.setdefault(me, set()).add(inc)
    return edges


def call_graph(sources: list[Path]) -> dict[str, set[str]]:
    texts = {str(f.relative_to(SRC)): strip(f.read_text()) for f in sources}
    defined: dict[str, str] = {}
    for name, text in texts.items():
        for fn in DEFINITION.findall(text):
            # Only functions other files can call: statics stay inside.
            if not re.search(r"^static\b[^\n]*\n" + re.escape(fn) + r"\(", text, re.M):
                defined.setdefault(fn, name)
    edges: dict[str, set[str]] = {}
    for name, text in texts.items():
        for ident in set(IDENT.findall(text)):
            owner = defined.get(ident)
            if owner is not None and owner != name:
                edges.setdefault(name, set()).add(owner)
    return edges


def coll_violations() -> list[str]:
    bad = []
    for f in sorted((SRC / "coll").glob("*.[ch]")):
        for inc in INCLUDE_ANY.findall(f.read_text()):
            if inc in FORBIDDEN_IN_COLL or inc.startswith("platform/"):
                bad.append(f"{f.relative_to(SRC)} includes {inc}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(SRC / "core"), help="directory to graph")
    ap.add_argument("--dot", action="store_true", help="print Graphviz dot instead of text")
    args = ap.parse_args()
    d = Path(args.dir).resolve()
    files = sorted(d.glob("*.[ch]"))
    sources = [f for f in files if f.suffix == ".c"]
    graphs = {
        "include": include_graph(files),
        "call": call_graph(sources),
    }
    status = 0
    for kind, edges in graphs.items():
        nodes = sorted({str(f.relative_to(SRC)) for f in (files if kind == "include" else sources)})
        if args.dot:
            print(f"digraph {kind} {{")
            for a in sorted(edges):
                for b in sorted(edges[a]):
                    print(f'  "{a}" -> "{b}";')
            print("}")
        else:
            print(f"{kind} graph of {d.relative_to(SRC.parent.parent)}:")
            for a in nodes:
                print(f"  {a} -> {', '.join(sorted(edges.get(a, ()))) or '(nothing)'}")
        cycle = find_cycle(nodes, edges)
        if cycle is not None:
            print(f"CYCLE in the {kind} graph: {' -> '.join(cycle)}", file=sys.stderr)
            status = 1
        elif not args.dot:
            print(f"  no cycle in the {kind} graph")
    bad = coll_violations()
    for b in bad:
        print(f"LAYER: {b}", file=sys.stderr)
    if bad:
        status = 1
    elif not args.dot:
        print("native/src/coll includes no socket, thread or connection header")
    return status


if __name__ == "__main__":
    sys.exit(main())
