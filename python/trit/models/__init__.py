"""Models that ship inside the package, so trit runs with no download.

Each is a checkpoint folder in the published microsoft/bitnet-b1.58-2B-4T
format, read by the same loader as any other model.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from trit._core import TritError

# The model used when no model is named.
DEFAULT = "tiny-fortunes"


def names() -> list[str]:
    """The bundled models present in this installation."""
    root = Path(str(files(__name__)))
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def path(name: str = DEFAULT) -> Path:
    """The folder of bundled model `name`."""
    folder = Path(str(files(__name__))) / name
    if not (folder / "config.json").is_file():
        present = ", ".join(names()) or "none"
        raise TritError(
            f"the bundled model {name!r} is not in this installation ({folder}); "
            f"bundled models present: {present}"
        )
    return folder
