"""The generated C API reference must match the header it is generated from."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_c_api_reference_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_c_api_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_every_public_function_is_documented():
    header = (ROOT / "native" / "include" / "pccl.h").read_text()
    doc = (ROOT / "docs" / "c-api.md").read_text()
    import re

    names = set(re.findall(r"\b(pccl_\w+)\s*\(", header))
    assert names, "no functions found in pccl.h"
    missing = sorted(n for n in names if f"### `{n}`" not in doc)
    assert not missing, f"undocumented in docs/c-api.md: {missing}"


def _cited_paths(text: str) -> set[str]:
    import re

    paths = set(
        re.findall(r"(?<![\w./-])((?:docs|pccl|native|benchmarks|examples|tests|tools)"
                   r"/[A-Za-z0-9_./-]*\.(?:md|py|c|h|txt|json|sh|toml|yml|yaml))\b", text)
    )
    paths.update(re.findall(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b", text))  # DESIGN.md, README.md
    return paths


# Generated at run time, not in the repository.
_GENERATED = ("benchmarks/out", "build/")


def test_no_doc_or_docstring_cites_a_missing_file():
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
               *sorted((ROOT / "benchmarks").glob("*.md"))]
    for top in ("pccl", "benchmarks", "examples", "tests", "tools"):
        sources += sorted((ROOT / top).rglob("*.py"))
    sources = [s for s in sources if s.name != "test_docs.py"]  # its own examples
    assert len(sources) > 20
    missing = []
    for src in sources:
        text = src.read_text()
        for path in sorted(_cited_paths(text)):
            if path.startswith(_GENERATED):
                continue
            here = [ROOT / path, src.parent / path]
            if not any(p.exists() for p in here):
                missing.append(f"{src.relative_to(ROOT)}: {path}")
    assert missing == []


def test_the_path_finder_finds_paths():
    assert _cited_paths("see `docs/api.md` and DESIGN.md; pccl/_wire.py.") == {
        "docs/api.md", "DESIGN.md", "pccl/_wire.py"}
