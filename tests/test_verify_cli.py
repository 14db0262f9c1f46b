"""``bayesretrieval verify`` on a real index: intact, a file flipped in the middle, a file deleted."""

import pytest
from conftest import clustered_index

from bayesretrieval.cli import main
from bayesretrieval.store import IndexReader


@pytest.fixture
def index(tmp_path):
    return clustered_index(tmp_path / "index", n=300, duplicates=5)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_intact_index_verifies(index, capsys):
    code, out, _ = run_cli(capsys, "verify", index)
    files = len(IndexReader.open(index).manifest.files)
    assert code == 0 and out.startswith("ok:") and "300 items" in out and f"{files} files intact" in out


def test_damaged_and_missing_files_are_named(index, capsys):
    version = IndexReader.open(index).version_dir
    items = version / "items.parquet"
    data = bytearray(items.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0xFF for b in data[middle:middle + 200])
    items.write_bytes(bytes(data))
    (version / "index.faiss").unlink()
    code, out, err = run_cli(capsys, "verify", index)
    assert code == 2 and not out
    assert "items.parquet (sha256 differs from the manifest)" in err and "index.faiss (missing)" in err
    assert "build-index SRC INDEX` repairs" in err and len(err.strip().splitlines()) == 1
