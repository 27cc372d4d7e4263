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
