"""GGUFFile: agreement with gguf.GGUFReader on valid files, and clean failures on damaged ones."""
from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType as QT
from gguf.constants import GGUFValueType as VT
from gguf.quants import dequantize, quantize

from pi_backend.model.gguf_file import GGUFError, GGUFFile
from pi_backend.model.gguf_write import set_magic, write_gguf

REPO = Path(__file__).resolve().parent.parent
PACKAGED_GGUFS = [REPO / "pi_backend/data/vocab/ggml-vocab-llama-spm.gguf", REPO / "pi_backend/data/tiny-relu.gguf"]


def _write_reference_file(path: Path, *, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A small GGUF written by gguf.GGUFWriter itself: every value type, several tensor types."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -100)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -2_000_000_000)
    writer.add_float32("test.f32", 0.1)
    writer.add_uint64("test.u64", 2**63 + 5)
    writer.add_int64("test.i64", -(2**62))
    writer.add_float64("test.f64", 1 / 3)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "wörld ▁ 日本")
    writer.add_array("test.array_str", ["a", "", "ü", "<0x0A>"])
    writer.add_key_value("test.array_u32", [1, 2, 3, 2**32 - 1], VT.ARRAY, VT.UINT32)
    writer.add_key_value("test.array_f32", [0.5, -1.25, 3.0], VT.ARRAY, VT.FLOAT32)
    writer.add_key_value("test.array_bool", [True, False, True], VT.ARRAY, VT.BOOL)
    writer.add_key_value("test.array_i64", [-1, 2**40], VT.ARRAY, VT.INT64)
    tensors = {
        "t.f32": rng.normal(size=(3, 5)).astype(np.float32),
        "t.f16": rng.normal(size=(4, 8)).astype(np.float16),
        "t.i32": np.arange(6, dtype=np.int32),
        "t.q8_0": rng.normal(size=(2, 64)).astype(np.float32),
        "t.q4_0": rng.normal(size=(3, 32)).astype(np.float32),
        "t.bf16": rng.normal(size=(2, 3, 4)).astype(np.float32),
    }
    for name, array in tensors.items():
        qtype = {"t.q8_0": QT.Q8_0, "t.q4_0": QT.Q4_0, "t.bf16": QT.BF16}.get(name)
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture
def reference_file(tmp_path) -> Path:
    path = tmp_path / "reference.gguf"
    _write_reference_file(path)
    return path


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def assert_agrees_with_gguf_reader(path: Path) -> None:
    reader = GGUFReader(path)
    with GGUFFile.open(path) as ours:
        fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert list(ours.metadata) == list(fields)
        for key, field in fields.items():
            assert _plain(ours.metadata[key]) == field.contents(), key
            vtype, sub_type = ours.metadata_types[key]
            assert vtype == field.types[0], key
            if vtype == VT.ARRAY:
                assert sub_type == field.types[-1], key
        assert ours.data_offset == reader.data_offset
        assert list(ours.tensors) == [t.name for t in reader.tensors]
        for rt in reader.tensors:
            info = ours.tensors[rt.name]
            assert info.ggml_type == rt.tensor_type
            assert info.shape == tuple(reversed(rt.shape.tolist()))
            assert info.offset == rt.data_offset
            assert info.nbytes == rt.n_bytes
            assert info.raw.tobytes() == rt.data.tobytes()
            view = ours.array(rt.name)
            if rt.tensor_type == QT.BF16:
                assert view.dtype == np.uint16 and view.shape == info.shape
                assert view.tobytes() == rt.data.tobytes()
            else:
                assert view.dtype == rt.data.dtype and view.shape == rt.data.shape
                np.testing.assert_array_equal(view, rt.data)


def test_agrees_with_gguf_reader_on_every_value_and_tensor(reference_file):
    assert_agrees_with_gguf_reader(reference_file)


@pytest.mark.parametrize("alignment", [1, 64, 256])
def test_custom_alignment(tmp_path, alignment):
    path = tmp_path / "aligned.gguf"
    _write_reference_file(path, alignment=alignment)
    assert_agrees_with_gguf_reader(path)
    with GGUFFile.open(path) as gguf:
        assert gguf.alignment == alignment
        assert gguf.data_offset % alignment == 0
        assert all(t.offset % alignment == 0 for t in gguf.tensors.values())


@pytest.mark.parametrize("path", PACKAGED_GGUFS, ids=lambda p: p.name)
def test_agrees_with_gguf_reader_on_packaged_files(path):
    assert_agrees_with_gguf_reader(path)


def test_typed_views_and_dequantize(tmp_path, reference_file):
    originals = _write_reference_file(tmp_path / "again.gguf")
    with GGUFFile.open(reference_file) as gguf:
        np.testing.assert_array_equal(gguf.array("t.f32"), originals["t.f32"])
        np.testing.assert_array_equal(gguf.array("t.f16"), originals["t.f16"])
        assert gguf.array("t.f16").dtype == np.float16
        q8 = gguf.tensors["t.q8_0"]
        assert q8.rows_view().shape == (2, 2 * 34)  # two Q8_0 blocks of 34 bytes per row
        assert gguf.array("t.q8_0").dtype == np.uint8
        for name, qtype in [("t.q8_0", QT.Q8_0), ("t.q4_0", QT.Q4_0), ("t.bf16", QT.BF16)]:
            expected = dequantize(quantize(originals[name], qtype), qtype)
            np.testing.assert_array_equal(gguf.dequantize(name), expected)
        bf16_bits = gguf.array("t.bf16")
        widened = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(widened, gguf.dequantize("t.bf16"))


def test_views_are_zero_copy_read_only_and_share_one_mapping(reference_file):
    def root(array):
        while getattr(array, "base", None) is not None:
            array = array.base
        return array

    with GGUFFile.open(reference_file) as gguf:
        views = [t.raw for t in gguf.tensors.values()] + [gguf.array("t.f32"), gguf.tensors["t.q4_0"].rows_view()]
        roots = {id(root(v)) for v in views}
        assert len(roots) == 1
        for view in views:
            assert not view.flags.owndata and not view.flags.writeable
            with pytest.raises(ValueError):
                view[...] = 0
        kept = gguf.array("t.f32")
    # closing drops the reader's mapping; views handed out stay valid, new access fails cleanly
    np.testing.assert_array_equal(kept, GGUFReader(reference_file).tensors[0].data)
    with pytest.raises(GGUFError, match="closed"):
        gguf.tensors["t.f32"].raw


def test_read_into_memory_gives_the_same_bytes_from_a_private_copy(reference_file):
    """--no-mmap: views taken after read_into_memory() hold the same bytes, from one in-memory copy."""
    with GGUFFile.open(reference_file) as mapped, GGUFFile.open(reference_file) as copied:
        copied.read_into_memory(chunk_bytes=100)  # many short reads
        for name in mapped.tensors:
            a, b = mapped.tensors[name].raw, copied.tensors[name].raw
            np.testing.assert_array_equal(a, b)
            assert not b.flags.writeable
            base = b
            while getattr(base, "base", None) is not None:
                base = base.base
            assert not isinstance(base, np.memmap)


def test_read_into_memory_without_the_memory_for_it(reference_file, monkeypatch):
    import pi_backend.model.gguf_file as gguf_file

    gguf = GGUFFile.open(reference_file)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(gguf_file.np, "empty", no_memory)
    with pytest.raises(GGUFError, match="out of memory.*use_mmap=True"):
        gguf.read_into_memory()
    monkeypatch.undo()
    np.testing.assert_array_equal(gguf.tensors["t.f32"].raw, GGUFFile.open(reference_file).tensors["t.f32"].raw)


def test_read_into_memory_of_a_file_that_shrank(tmp_path, reference_file):
    path = tmp_path / "shrinks.gguf"
    path.write_bytes(reference_file.read_bytes())
    gguf = GGUFFile.open(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(GGUFError, match="shrank"):
        gguf.read_into_memory()


def test_powerinfer_magic(tmp_path):
    tensors = {"w": np.arange(8, dtype=np.float32).reshape(2, 4)}
    plain = write_gguf(tmp_path / "plain.gguf", "llama", {"a.b": 1}, tensors)
    pwri = write_gguf(tmp_path / "sparse.gguf", "llama", {"a.b": 1}, tensors, powerinfer=True)
    assert pwri.read_bytes()[:4] == b"PWRI" and pwri.read_bytes()[4:] == plain.read_bytes()[4:]
    with pytest.raises(ValueError):
        GGUFReader(pwri)  # why this reader exists
    with GGUFFile.open(plain) as a, GGUFFile.open(pwri) as b:
        assert (a.magic, a.is_powerinfer) == ("GGUF", False)
        assert (b.magic, b.is_powerinfer) == ("PWRI", True)
        assert a.metadata == b.metadata and a.version == b.version == 3
        np.testing.assert_array_equal(b.array("w"), tensors["w"])
    set_magic(pwri, powerinfer=False)
    assert pwri.read_bytes() == plain.read_bytes()


# ---- damaged and hostile files -------------------------------------------------------------------


def _expect_error(path: Path, *fragments: str) -> GGUFError:
    start = time.monotonic()
    with pytest.raises(GGUFError) as info:
        GGUFFile.open(path)
    assert time.monotonic() - start < 2.0, "rejecting a bad file must be fast"
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return info.value


def _patched(src: Path, dst: Path, offset: int, new: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[offset : offset + len(new)] = new
    dst.write_bytes(bytes(data))
    return dst


def _key_offset(data: bytes, key: str) -> int:
    """Offset of a metadata key's u64 length prefix."""
    raw = key.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw)
    return at


def _value_offset(data: bytes, key: str) -> int:
    """Offset of a key's u32 value type (right after the key)."""
    return _key_offset(data, key) + 8 + len(key.encode())


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Offset just after a tensor's name in the tensor-info table (its u32 n_dims)."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw, _key_offset(data, "test.array_i64")) + 8 + len(raw)


def test_truncated_file_at_any_point(tmp_path, reference_file):
    data = reference_file.read_bytes()
    with GGUFFile.open(reference_file) as gguf:
        end_of_data = max(t.offset + t.nbytes for t in gguf.tensors.values())
    cuts = sorted(set(range(0, gguf.data_offset + 8, 3)) | set(range(gguf.data_offset, end_of_data, 37)) | {end_of_data - 1})
    short = tmp_path / "short.gguf"
    for cut in cuts:
        short.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as info:
            GGUFFile.open(short)
        assert str(short) in str(info.value)
    # trailing padding after the last tensor is not data: without it the file is still whole
    short.write_bytes(data[:end_of_data])
    assert GGUFFile.open(short).tensors.keys() == gguf.tensors.keys()


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_error(empty, "too small")
    _expect_error(tmp_path / "absent.gguf", "cannot open")
    with pytest.raises(GGUFError):
        GGUFFile.open(tmp_path)


@pytest.mark.parametrize("magic", [b"GGML", b"\0\0\0\0", b"PWR\xff", b"gguf"])
def test_wrong_magic(tmp_path, reference_file, magic):
    _expect_error(_patched(reference_file, tmp_path / "m.gguf", 0, magic), "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_unsupported_version(tmp_path, reference_file, version):
    err = _expect_error(_patched(reference_file, tmp_path / "v.gguf", 4, struct.pack("<I", version)), "unsupported GGUF version")
    if version == 0x03000000:
        assert "big-endian" in str(err)


def test_version_2_is_read(tmp_path, reference_file):
    path = _patched(reference_file, tmp_path / "v2.gguf", 4, struct.pack("<I", 2))
    with GGUFFile.open(path) as gguf:
        assert gguf.version == 2 and len(gguf.tensors) == 6


@pytest.mark.parametrize("offset,what", [(8, "tensor count"), (16, "metadata count")])
@pytest.mark.parametrize("count", [2**60, 2**64 - 1, 10**6])
def test_absurd_counts(tmp_path, reference_file, offset, what, count):
    _expect_error(_patched(reference_file, tmp_path / "c.gguf", offset, struct.pack("<Q", count)), what, "cannot fit")


@pytest.mark.parametrize("length", [2**40, 2**64 - 1, 5000])
def test_key_length_past_end_of_file(tmp_path, reference_file, length):
    data = reference_file.read_bytes()
    at = _key_offset(data, "test.string")
    _expect_error(_patched(reference_file, tmp_path / "k.gguf", at, struct.pack("<Q", length)), "only", "remain")


def test_string_value_length_past_end_of_file(tmp_path, reference_file):
    data = reference_file.read_bytes()
    at = _value_offset(data, "test.string") + 4
    _expect_error(_patched(reference_file, tmp_path / "s.gguf", at, struct.pack("<Q", 2**50)), "'test.string'")


@pytest.mark.parametrize("key", ["test.array_u32", "test.array_str", "test.array_bool"])
def test_array_count_past_end_of_file(tmp_path, reference_file, key):
    data = reference_file.read_bytes()
    at = _value_offset(data, key) + 4 + 4  # value type, item type, then the u64 count
    _expect_error(_patched(reference_file, tmp_path / "a.gguf", at, struct.pack("<Q", 2**40)), repr(key), "cannot fit")


def test_unknown_value_types(tmp_path, reference_file):
    data = reference_file.read_bytes()
    at = _value_offset(data, "test.u32")
    _expect_error(_patched(reference_file, tmp_path / "t.gguf", at, struct.pack("<I", 13)), "'test.u32'", "unknown value type 13")
    at = _value_offset(data, "test.array_u32") + 4
    _expect_error(_patched(reference_file, tmp_path / "t2.gguf", at, struct.pack("<I", 99)), "'test.array_u32'", "unknown value type 99")


def test_invalid_bool(tmp_path, reference_file):
    data = reference_file.read_bytes()
    at = _value_offset(data, "test.bool") + 4
    _expect_error(_patched(reference_file, tmp_path / "b.gguf", at, b"\x07"), "'test.bool'", "0 or 1")


def test_non_utf8_garbage_in_key_value_and_tensor_name(tmp_path, reference_file):
    data = reference_file.read_bytes()
    at = _key_offset(data, "test.u8") + 8
    _expect_error(_patched(reference_file, tmp_path / "k.gguf", at, b"\xff\xfe\x80"), "not valid UTF-8")
    at = _value_offset(data, "test.string") + 4 + 8
    _expect_error(_patched(reference_file, tmp_path / "v.gguf", at, b"\xc3\x28"), "'test.string'", "not valid UTF-8")
    at = _tensor_info_offset(data, "t.f16") - len("t.f16")
    _expect_error(_patched(reference_file, tmp_path / "n.gguf", at, b"\xe2\x82"), "tensor #1", "not valid UTF-8")


def test_duplicate_key_and_tensor_names(tmp_path, reference_file):
    data = reference_file.read_bytes()
    at = _key_offset(data, "test.i8") + 8
    _expect_error(_patched(reference_file, tmp_path / "k.gguf", at, b"test.u8"), "duplicate metadata key 'test.u8'")
    at = _tensor_info_offset(data, "t.f16") - len("t.f16")
    _expect_error(_patched(reference_file, tmp_path / "t.gguf", at, b"t.f32"), "duplicate tensor name 't.f32'")


@pytest.mark.parametrize("raw_type", [4, 5, 31, 999])
def test_unknown_ggml_type(tmp_path, reference_file, raw_type):
    data = reference_file.read_bytes()
    at = _tensor_info_offset(data, "t.f16") + 4 + 2 * 8  # n_dims, two dims, then the type
    _expect_error(_patched(reference_file, tmp_path / "g.gguf", at, struct.pack("<I", raw_type)), "'t.f16'", f"unknown ggml type {raw_type}")


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_dimension_count(tmp_path, reference_file, n_dims):
    data = reference_file.read_bytes()
    at = _tensor_info_offset(data, "t.f16")
    _expect_error(_patched(reference_file, tmp_path / "d.gguf", at, struct.pack("<I", n_dims)), "'t.f16'", "dimensions")


def test_tensor_sizes_and_offsets_past_end_of_file(tmp_path, reference_file):
    data = reference_file.read_bytes()
    dims = _tensor_info_offset(data, "t.f16") + 4
    _expect_error(_patched(reference_file, tmp_path / "big.gguf", dims, struct.pack("<Q", 2**40)), "'t.f16'", "runs past the end")
    huge = struct.pack("<QQ", 2**40, 2**40)
    _expect_error(_patched(reference_file, tmp_path / "ovf.gguf", dims, huge), "'t.f16'", "overflows")
    offset = dims + 2 * 8 + 4
    _expect_error(_patched(reference_file, tmp_path / "off.gguf", offset, struct.pack("<Q", 2**62)), "'t.f16'", "runs past the end")


def test_misaligned_and_overlapping_tensors(tmp_path, reference_file):
    data = reference_file.read_bytes()
    offset = _tensor_info_offset(data, "t.f16") + 4 + 2 * 8 + 4
    _expect_error(_patched(reference_file, tmp_path / "mis.gguf", offset, struct.pack("<Q", 4)), "'t.f16'", "not a multiple of the alignment")
    _expect_error(_patched(reference_file, tmp_path / "ovl.gguf", offset, struct.pack("<Q", 0)), "'t.f16'", "overlaps tensor 't.f32'")


def test_quantized_row_not_a_whole_block(tmp_path, reference_file):
    data = reference_file.read_bytes()
    ne0 = _tensor_info_offset(data, "t.q8_0") + 4
    _expect_error(_patched(reference_file, tmp_path / "q.gguf", ne0, struct.pack("<Q", 48)), "'t.q8_0'", "block size 32")


def test_bad_alignment_values(tmp_path):
    for value, vtype, fragment in [(48, VT.UINT32, "not a power of two"), (0, VT.UINT32, "not a power of two"), (32, VT.UINT64, "must be a UINT32")]:
        path = tmp_path / f"align-{value}-{vtype.name}.gguf"
        writer = GGUFWriter(path, "llama")
        writer.add_key_value("general.alignment", value, vtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _expect_error(path, "general.alignment", fragment)


def test_random_corruption_never_escapes_as_another_error(tmp_path, reference_file):
    """Single-byte and 8-byte corruptions anywhere in the header: parse or raise GGUFError, quickly."""
    data = reference_file.read_bytes()
    with GGUFFile.open(reference_file) as gguf:
        header_end = gguf.data_offset
    rng = np.random.default_rng(42)
    path = tmp_path / "fuzz.gguf"
    for trial in range(400):
        corrupt = bytearray(data)
        at = int(rng.integers(0, header_end))
        width = 1 if trial % 2 else 8
        corrupt[at : at + width] = rng.integers(0, 256, size=len(corrupt[at : at + width]), dtype=np.uint8).tobytes()
        path.write_bytes(bytes(corrupt))
        start = time.monotonic()
        try:
            GGUFFile.open(path).close()
        except GGUFError:
            pass
        assert time.monotonic() - start < 2.0
