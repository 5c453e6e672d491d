"""Which server paths a request may name: only files under the operator's input roots.

`LIPSYNC_INPUT_ROOTS` is empty by default, so path inputs are refused until an operator allows
a directory. The path is resolved (symlinks and `..`) before the check, so neither a `..` nor a
symlink inside a root can reach a file outside it.
"""
from __future__ import annotations

import os
from pathlib import Path

from cluster.errors import InputNotFound, UnsafeInput


def check_input_path(value: str, roots: list[Path], field: str = "path") -> str:
    """The resolved absolute path of `value` if it is an existing file under one of `roots`;
    `input.unsafe` naming the field otherwise (`input.not_found` for a missing file inside a root)."""
    if not roots:
        raise UnsafeInput(f"{field}: server paths are not accepted here (no LIPSYNC_INPUT_ROOTS configured); "
                          f"upload the file or give an http(s) URL", path=field)
    if "\x00" in value:
        raise UnsafeInput(f"{field}: the path contains a NUL byte", path=field)
    p = Path(value).expanduser()
    if not p.is_absolute():
        raise UnsafeInput(f"{field}: {value!r} is not an absolute path", path=field)
    resolved = Path(os.path.realpath(p))
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if not any(resolved == r or resolved.is_relative_to(r) for r in real_roots):
        raise UnsafeInput(f"{field}: {value} is outside the allowed input directories "
                          f"({':'.join(map(str, roots))})", path=field)
    if not resolved.is_file():
        raise InputNotFound(f"{field}: {value} does not exist or is not a file", path=field)
    return str(resolved)
