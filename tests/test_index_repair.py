"""An index you can trust for months: damaged files are named, and ``build-index SRC INDEX`` repairs them.

One clean index over real image files (bayes-tiny from a fixed checkpoint) is built once
and copied per test; each test damages its copy, checks that opening, searching and
``verify`` name the damaged file, then repairs it with the command given only SRC and
INDEX and compares the search results with the clean index's.
"""

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import random_posterior, save_tiny_checkpoint, write_images

from bayesretrieval.cli import main
from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, EmptySourceError, build_index
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.queries import RESULT_COLUMNS, Searcher
from bayesretrieval.queries.filters import ItemFilter
from bayesretrieval.store import IndexDamagedError, IndexReader

D = 64
NAMES = [f"d{i % 2}/img {i}.png" for i in range(8)]
QUERIES = ["a photo of a dog", "noise", "a red square"]
REPAIR_HINT = "`bayesretrieval build-index SRC INDEX` repairs the index"


@dataclass
class Clean:
    """The module's clean index and what built it."""

    src: Path
    index: Path
    checkpoint: Path
    encoder: ClipEncoder
    posterior: PosteriorPair
    results: pd.DataFrame
    ids: dict


def search(index: Path, encoder: ClipEncoder, where: ItemFilter | None = None) -> pd.DataFrame:
    """Every item for every query of :data:`QUERIES`, ranked."""
    with Searcher.open(index, encoder=encoder) as searcher:
        return searcher.search(QUERIES, k=len(NAMES), where=where)


def ids_by_path(index: Path) -> dict:
    with IndexReader.open(index) as reader:
        return dict(zip(reader.paths(reader.item_ids), np.asarray(reader.item_ids).tolist()))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Clean:
    root = tmp_path_factory.mktemp("clean")
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    encoder = ClipEncoder.from_pretrained(TINY_MODEL, checkpoint)
    posterior = random_posterior(D, 64, model=encoder.identity)
    write_images(root / "src", NAMES)
    build_index(root / "src", root / "index", encoder, posterior, BuildConfig(batch_size=4, workers=0))
    return Clean(root / "src", root / "index", checkpoint, encoder, posterior, search(root / "index", encoder),
                 ids_by_path(root / "index"))


@pytest.fixture
def index(clean, tmp_path) -> Path:
    """A fresh copy of the clean index."""
    return Path(shutil.copytree(clean.index, tmp_path / "index", ignore=shutil.ignore_patterns("readers")))


def version_file(index: Path, name: str) -> Path:
    """``name`` in the index's current version folder."""
    with IndexReader.open(index) as reader:
        return reader.version_dir / name


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_damage_named(code: int, out: str, err: str, name: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr naming ``name`` and the repair."""
    assert code == 2 and not out, (code, out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert name in err and REPAIR_HINT in err, err


def repair(capsys, src: Path, index: Path) -> str:
    """``build-index SRC INDEX`` with no model, posterior or --rebuild option; its stdout."""
    code, out, err = run_cli(capsys, "build-index", src, index, "--workers", "0", "--batch-size", "4",
                             "--no-progress")
    assert code == 0, err
    code, verified, err = run_cli(capsys, "verify", index)
    assert code == 0 and verified.startswith("ok:"), err
    return out


def assert_same_results(got: pd.DataFrame, want: pd.DataFrame, reencoded: bool = False) -> None:
    """Same ids and paths at every rank; cosines equal (re-encoded: up to float noise)."""
    pd.testing.assert_frame_equal(got[["query", "rank", "item_id", "path"]], want[["query", "rank", "item_id", "path"]])
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if reencoded else {"rtol": 0, "atol": 0}
    np.testing.assert_allclose(got["cosine_mean"], want["cosine_mean"], **tolerance)


def test_deleted_faiss_file_is_named_and_rebuilt_from_the_stored_rows(clean, index, capsys):
    version_file(index, "index.faiss").unlink()
    with pytest.raises(IndexDamagedError, match=r"index\.faiss \(missing\)"):
        Searcher.open(index, encoder=clean.encoder)
    assert_damage_named(*run_cli(capsys, "search", index, "a dog"), "index.faiss")
    out = repair(capsys, clean.src, index)
    assert "index v000002: 8 items\n" in out and "processed 0 files" in out and "unchanged 8" in out, out
    assert ids_by_path(index) == clean.ids
    assert_same_results(search(index, clean.encoder), clean.results)


def test_truncated_items_table_is_named_and_reencoded_under_the_same_ids(clean, index, capsys):
    items = version_file(index, "items.parquet")
    items.write_bytes(items.read_bytes()[:500])
    with pytest.raises(IndexDamagedError, match=rf"{re.escape(str(items))} \(500 bytes, written with \d+\)"):
        IndexReader.open(index)
    assert_damage_named(*run_cli(capsys, "search", index, "a dog"), "items.parquet")
    out = repair(capsys, clean.src, index)
    assert "index v000002: 8 items\n" in out and "processed 8 files" in out and "unchanged 0" in out, out
    assert ids_by_path(index) == clean.ids
    assert_same_results(search(index, clean.encoder), clean.results, reencoded=True)


def flip(path: Path, middle: int, count: int = 200) -> None:
    """Invert ``count`` bytes of ``path`` around offset ``middle`` (the size stays)."""
    data = bytearray(path.read_bytes())
    start = middle - count // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def metadata_pages_middle(items: Path) -> int:
    """The middle of the pages of the columns before ``embedding`` (the ones a filter reads)."""
    row_group = pq.ParquetFile(items).metadata.row_group(0)
    starts = {row_group.column(i).path_in_schema.split(".")[0]:
              row_group.column(i).dictionary_page_offset or row_group.column(i).data_page_offset
              for i in range(row_group.num_columns)}
    assert starts["embedding"] - starts["item_id"] > 400
    return (starts["item_id"] + starts["embedding"]) // 2


@pytest.mark.parametrize("region", ["file middle", "metadata pages"])
def test_flipped_bytes_in_items_table_fail_verify_and_reads(clean, index, capsys, region):
    items = version_file(index, "items.parquet")
    size = items.stat().st_size
    footer_start = size - 8 - int.from_bytes(items.read_bytes()[-8:-4], "little")
    assert 0 < footer_start < size // 2 - 100, "8 items: the middle of the file lies in its footer"
    flip(items, size // 2 if region == "file middle" else metadata_pages_middle(items))
    code, out, err = run_cli(capsys, "verify", index)
    assert_damage_named(code, out, err, "items.parquet (sha256 differs from the manifest)")
    damaged = rf"index file {re.escape(str(items))} is damaged \(.+\); .*{re.escape(REPAIR_HINT)}"
    if region == "file middle":  # the footer is read at open
        with pytest.raises(IndexDamagedError, match=damaged):
            Searcher.open(index, encoder=clean.encoder)
    else:  # same size, intact footer: the cheap checks at open pass, a filtered read of the pages does not
        with Searcher.open(index, encoder=clean.encoder) as searcher:
            with pytest.raises(IndexDamagedError, match=damaged):
                searcher.search(QUERIES, k=3, where=ItemFilter(where="width > 0 and height > 0"))
    code, out, err = run_cli(capsys, "search", index, "a dog", "--where", "file_size > 0")
    assert_damage_named(code, out, err, "items.parquet")
    out = repair(capsys, clean.src, index)
    assert "index v000002: 8 items\n" in out and "processed 8 files" in out, out
    assert ids_by_path(index) == clean.ids
    assert_same_results(search(index, clean.encoder), clean.results, reencoded=True)
    filtered = search(index, clean.encoder, where=ItemFilter(path_prefix="d0/", where="width > 0"))
    assert sorted(filtered["path"].unique()) == sorted(n for n in NAMES if n.startswith("d0/"))


def test_truncated_means_are_named_and_restored_from_the_items_table(clean, index, capsys):
    means = version_file(index, "means.npy")
    means.write_bytes(means.read_bytes()[: means.stat().st_size // 2])
    with pytest.raises(IndexDamagedError, match=rf"{re.escape(str(means))} \(\d+ bytes, written with \d+\)"):
        Searcher.open(index, encoder=clean.encoder)
    assert_damage_named(*run_cli(capsys, "search", index, "a dog"), "means.npy")
    out = repair(capsys, clean.src, index)
    assert "index v000002: 8 items\n" in out and "processed 0 files" in out and "unchanged 8" in out, out
    assert_same_results(search(index, clean.encoder), clean.results)


def test_truncated_top_manifest_is_named_everywhere_and_republished(clean, index, capsys):
    manifest = index / "manifest.json"
    text = manifest.read_bytes()
    manifest.write_bytes(text[: len(text) // 2])
    named = rf"index manifest {re.escape(str(manifest))} is damaged \(.*\); .*{re.escape(REPAIR_HINT)}"
    with pytest.raises(IndexDamagedError, match=named):
        Searcher.open(index, encoder=clean.encoder)
    assert_damage_named(*run_cli(capsys, "search", index, "a dog"), str(manifest))
    assert_damage_named(*run_cli(capsys, "verify", index), str(manifest))
    out = repair(capsys, clean.src, index)
    assert "index v000002: 8 items\n" in out and "processed 0 files" in out, out
    assert_same_results(search(index, clean.encoder), clean.results)


def test_rerun_with_only_src_and_index_uses_the_recorded_model_offline(clean, index, tmp_path, capsys, monkeypatch):
    for name, value in {"HF_HUB_OFFLINE": "1", "BAYESRETRIEVAL_OFFLINE": "1",
                        "BAYESRETRIEVAL_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    src = Path(shutil.copytree(clean.src, tmp_path / "src"))
    with IndexReader.open(index) as reader:
        before = reader.manifest
    write_images(src, ["new/added.png"], seed=11)
    code, out, err = run_cli(capsys, "build-index", src, index)
    assert code == 0, err
    assert "index v000002: 9 items\n" in out and "processed 1 files" in out and "unchanged 8" in out, out
    with IndexReader.open(index) as reader:
        after = reader.manifest
    assert after.model == before.model and after.model["pretrained"] == str(clean.checkpoint)
    assert after.posterior["fingerprint"] == before.posterior["fingerprint"] == clean.posterior.fingerprint
    assert after.variance == before.variance
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_source_without_images_is_refused_unless_allowed(clean, tmp_path, capsys, content):
    src, index = tmp_path / "src", tmp_path / "index"
    src.mkdir()
    if content:
        (src / content).write_text("not a picture\n")
    clean.posterior.save(tmp_path / "posterior")
    with pytest.raises(EmptySourceError, match="allow_empty=True"):
        build_index(src, index, clean.encoder, clean.posterior, BuildConfig(workers=0))
    argv = ["build-index", src, index, "--model", TINY_MODEL, "--pretrained", clean.checkpoint,
            "--posterior", tmp_path / "posterior", "--workers", "0", "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, (out, err)
    assert f"no image files under {src}" in err and "--allow-empty" in err
    assert not index.exists()
    code, out, err = run_cli(capsys, *argv, "--allow-empty")
    assert code == 0 and "index v000001: 0 items" in out, err
    with IndexReader.open(index) as reader:
        assert len(reader) == 0 and reader.read_items().num_rows == 0
    results = search(index, clean.encoder)
    assert results.empty and list(results.columns) == list(RESULT_COLUMNS)
    code, out, err = run_cli(capsys, "search", index, "a dog")
    assert code == 0 and out.strip() == "no results", (out, err)
    code, out, _ = run_cli(capsys, "verify", index)
    assert code == 0 and "0 items" in out
