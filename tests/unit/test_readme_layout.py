"""README's layout table matches the folder listing: every path it names exists, and every
module and folder of the package (and every top-level folder of the repository) is named."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Not worth a row: the package's face is described in the README's text.
UNLISTED = {"__init__.py", "__main__.py", "py.typed", "__pycache__"}


def layout_paths() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    paths: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            paths.update(p.rstrip("/") for p in re.findall(r"`([^`]+)`", first))
    return paths


def test_every_named_path_exists() -> None:
    missing = sorted(p for p in layout_paths() if not (ROOT / p).exists())
    assert missing == [], f"README's layout names paths that do not exist: {missing}"


def test_every_package_entry_and_top_folder_is_named() -> None:
    named = layout_paths()
    entries = {
        f"tpm_faas/{p.name}"
        for p in (ROOT / "tpm_faas").iterdir()
        if p.name not in UNLISTED and not p.name.startswith(".")
    }
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    folders = {f.split("/")[0] for f in tracked if "/" in f and not f.startswith(".")}
    folders.discard("tpm_faas")  # its entries are checked one by one above
    assert sorted(entries - named) == [], "add these package entries to README's layout"
    assert sorted(folders - named) == [], "add these folders to README's layout"
