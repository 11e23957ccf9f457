"""page_cache.make_resident: every path leaves the mapping reading the file's bytes, and each path is
taken when its condition holds (the kernel's answers are substituted where a test cannot force them)."""
from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from pi_backend.model import page_cache
from pi_backend.model.gguf_file import GGUFFile
from pi_backend.model.gguf_write import write_gguf

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / smaps are Linux's")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A GGUF of 24 MiB: enough 2 MiB pages for the huge-page checks to apply."""
    values = np.random.default_rng(0).standard_normal((6, 1 << 20)).astype(np.float32)
    path = write_gguf(tmp_path_factory.mktemp("pc") / "big.gguf", "llama", {"a.b": 1}, {"w": values})
    return path, values


def _mapping(path):
    g = GGUFFile.open(path)
    return g, g._mm._mmap, g._mm.ctypes.data


def _same_bytes(path, values):
    with GGUFFile.open(path) as g:
        np.testing.assert_array_equal(g.array("w"), values)


@linux_only
def test_smaps_reports_the_mapping_and_nothing_for_unknown_addresses(big_file):
    g, _, address = _mapping(big_file[0])
    assert isinstance(page_cache.huge_mapped_bytes(address), int)
    assert page_cache.huge_mapped_bytes(address + 4096) is None  # not the start of a mapping
    g.close()


@linux_only
def test_prefetch_leaves_the_file_resident_with_its_bytes(big_file):
    path, values = big_file
    with GGUFFile.open(path) as g:
        assert g.prefetch() in ("huge", "resident", "re-read")
        np.testing.assert_array_equal(g.array("w"), values)


@linux_only
def test_small_pages_in_the_cache_are_read_again(big_file, monkeypatch):
    """Most of the cache in small pages while some huge ones exist: the file is dropped and faulted in
    again, and the mapping still reads the same bytes."""
    path, values = big_file
    calls = []
    monkeypatch.setattr(page_cache, "huge_mapped_bytes", lambda address: calls.append(address) or 2 << 20)
    with GGUFFile.open(path) as g:
        assert g.prefetch() == "re-read"
        assert calls == [g._mm.ctypes.data]
        np.testing.assert_array_equal(g.array("w"), values)
    _same_bytes(path, values)


@linux_only
def test_no_huge_pages_at_all_means_no_re_read(big_file, monkeypatch):
    """A kernel or filesystem that maps no file huge pages: reading the file again would gain nothing."""
    path, values = big_file
    monkeypatch.setattr(page_cache, "huge_mapped_bytes", lambda address: 0)
    dropped = []
    monkeypatch.setattr(page_cache.os, "posix_fadvise", lambda *a: dropped.append(a), raising=False)
    with GGUFFile.open(path) as g:
        assert g.prefetch() == "resident"
    assert dropped == []


@linux_only
def test_a_file_larger_than_memory_allows_is_only_advised(big_file, monkeypatch):
    path, values = big_file
    monkeypatch.setattr(page_cache, "available_bytes", lambda: 1 << 20)
    advice = []
    real = page_cache._advise
    monkeypatch.setattr(page_cache, "_advise", lambda raw, opt: advice.append(opt) or real(raw, opt))
    with GGUFFile.open(path) as g:
        assert g.prefetch() == "advised"
        np.testing.assert_array_equal(g.array("w"), values)
    assert page_cache.MADV_POPULATE_READ not in advice
    assert advice[-1] == mmap.MADV_WILLNEED


def test_a_file_read_into_memory_has_no_mapping_to_advise(big_file):
    path, values = big_file
    with GGUFFile.open(path) as g:
        g.read_into_memory()
        assert g.prefetch() == "none"
        np.testing.assert_array_equal(g.array("w"), values)
