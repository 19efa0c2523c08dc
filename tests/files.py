"""Reading a folder tree whole, for tests that compare outputs byte for byte."""

from __future__ import annotations

import os


def read_tree(root: str) -> dict[str, bytes]:
    """{path relative to root: bytes} of every file under `root`."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out
