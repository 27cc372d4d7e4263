"""Every shell command the docs mark as runnable works, as written, from the
repository root.

The marking: a fenced block whose info string is ``sh runnable`` (in
README.md and docs/*.md).  Each line of it is one command (a line ending in
``\\`` continues on the next); blank lines and ``#`` comment lines are
skipped.  The commands of one block run in order in one ``bash`` (so a
``. .venv/bin/activate`` line applies to the rest), with ``set -e``, from
the repository root, with this interpreter's ``bin/`` first on ``PATH`` (as
after activating the venv); the block must exit 0 within its timeout
(``sh runnable timeout=SECONDS``, default 180).  Keep marked commands short:
``--help``, a run of a few seconds; ``make test`` and ``make demo`` are not
for here (tests/test_demo.py runs the demo).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```sh runnable(?:\s+timeout=(\d+))?\s*$")
DEFAULT_TIMEOUT = 180


@dataclass
class Block:
    where: str  # file:line
    commands: list[str]
    timeout: int


def blocks_in(path: Path, root: Path = ROOT) -> list[Block]:
    lines = path.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i + 1
        commands: list[str] = []
        pending = ""
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            line = lines[i]
            i += 1
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            commands.append(pending + line)
            pending = ""
        if i >= len(lines):
            raise AssertionError(f"{path}:{start}: unterminated runnable block")
        assert not pending, f"{path}:{start}: a continued line never ends"
        rel = path.relative_to(root)
        found.append(Block(f"{rel}:{start}", commands, int(m.group(1) or DEFAULT_TIMEOUT)))
        i += 1
    return found


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [b for path in DOCS for b in blocks_in(path)]


def test_the_docs_mark_commands():
    # The scheme is in use where it matters (a typo in the info string
    # would silently drop a block).
    where = {b.where.split(":")[0] for b in BLOCKS}
    assert {"README.md", "docs/testing.md", "docs/operations.md"} <= where, where
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```") and "runnable" in line:
                assert FENCE.match(line), f"{path}:{n}: malformed runnable fence {line!r}"


def test_the_parser_joins_continued_lines(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```sh runnable timeout=7\n# comment\necho a \\\n    b\n\necho c\n```\n")
    (block,) = blocks_in(doc, tmp_path)
    assert block.commands == ["echo a      b", "echo c"] and block.timeout == 7


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_runnable_command(block: Block):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PCCL_LOG", None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    script = "set -e\n" + "\n".join(block.commands) + "\n"
    # Its own session, so that a timeout ends every process it started.
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=block.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{block.where}: still running after {block.timeout} s:\n"
                             f"{script}\n--- stderr\n{err[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, (
        f"{block.where}: exit {proc.returncode}\n{script}\n--- stdout\n{out[-3000:]}"
        f"\n--- stderr\n{err[-3000:]}"
    )
