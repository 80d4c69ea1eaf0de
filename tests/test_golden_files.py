"""The test data in tests/golden is what its SHA256SUMS say, file for file (RAM's vocabulary md5s are also
checked against the loader's pins by tests/test_ram.py): a damaged or line-ending-converted
copy would otherwise make the golden comparisons fail (or pass) for the wrong reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GOLDEN, RAM_VOCABULARY

from lion_mllm.checkpoints.downloads import file_digest

UNLISTED = {"README.md", "SHA256SUMS"}  # the manifest and the sums themselves


def listed(folder: Path) -> dict[str, str]:
    """{relative path: sha256} from the folder's SHA256SUMS (`sha256sum` format: digest, two spaces, path)."""
    sums = {}
    for line in (folder / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    return sums


@pytest.mark.parametrize("folder", [GOLDEN, RAM_VOCABULARY], ids=lambda f: f.name)
def test_every_file_matches_its_checksum_and_is_listed(folder: Path):
    sums = listed(folder)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - UNLISTED
    assert present == set(sums), f"{folder}: files and SHA256SUMS differ"
    wrong = [name for name, digest in sums.items()
             if file_digest(folder / name, "sha256") != digest]
    assert not wrong, f"{folder}: checksum mismatch for {wrong}"

