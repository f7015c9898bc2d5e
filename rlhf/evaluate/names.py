"""Short names for the folders an evaluation compares (table columns, plot labels, report sub-folders)."""

from __future__ import annotations

import os
from pathlib import Path


def display_names(paths: list[str]) -> dict[str, str]:
    """Each path by its folder's name (runs/tiny/dpo -> dpo) or, where two folders' names would clash, by as many of
    its last folders as tell it apart (runs/a/reward and runs/b/reward -> a/reward and b/reward). Every name is
    relative and free of '..', so it can also name a sub-folder of a report folder. One folder given twice (dpo and
    ./dpo) is no clash: it is the same folder."""
    # abspath, not resolve(): "." gets its real name, but a symlinked folder keeps the name it was given.
    parts = {path: Path(os.path.abspath(path)).parts[1:] for path in paths}  # [1:]: without the root
    names = {}
    for path in paths:
        own = parts[path]
        others = {parts[other] for other in paths} - {own}
        depth = 1
        while depth < len(own) and any(other[-depth:] == own[-depth:] for other in others):
            depth += 1
        names[path] = "/".join(own[-depth:])
    return names
