"""Generate the cffi API-mode extension source from native/include/pccl.h.

The cdef is the public header itself with preprocessor lines and the C++
guards removed, so the bindings cannot drift from the header.

Usage: python tools/gen_ffi.py native/include/pccl.h OUT.c
"""

import re
import sys

import cffi


def header_to_cdef(text: str) -> str:
    """Strip what pycparser cannot read: directives and extern "C" guards."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if stripped in ('extern "C" {', "}") and not line.startswith("} "):
            # the C++ guard's braces stand alone on their line; struct and
            # enum bodies close with "} name;".
            continue
        lines.append(line)
    return "\n".join(lines)


def main(header_path: str, out_path: str) -> None:
    with open(header_path, encoding="utf-8") as f:
        cdef = header_to_cdef(f.read())
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source("pccl._pccl_native", '#include "pccl.h"\n')
    ffi.emit_c_code(out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
