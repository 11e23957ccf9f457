"""Read GGUF v2/v3 files, including PowerInfer's `PWRI`-magic variant, defensively.

The stock `gguf.GGUFReader` rejects the PWRI magic and trusts its header (a lying count can make it
allocate or loop for ages). This reader accepts both magics and checks every length, count and
offset against the bytes actually in the file *before* acting on it, so a damaged or hostile file
fails fast with a `GGUFError` that names the file, the problem and the key or tensor involved.

Tensor data is never copied: one read-only `np.memmap` of the whole file backs every tensor view (or,
after `read_into_memory()`, one private in-memory copy of the file instead of the mapping).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from pi_backend.model import page_cache

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "GGUF_MAGIC_BYTES", "POWERINFER_MAGIC_BYTES"]

GGUF_MAGIC_BYTES = b"GGUF"
POWERINFER_MAGIC_BYTES = b"PWRI"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
# Arrays of arrays are legal GGUF but unused in practice; a bound keeps a crafted file from
# recursing until Python's stack runs out.
MAX_ARRAY_NESTING = 4

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "B",  # validated to 0/1 below
}
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    vtype: np.dtype("<" + fmt) for vtype, fmt in _SCALAR_FORMATS.items() if vtype != GGUFValueType.BOOL
}
# The fewest bytes a value of each type can occupy: an upper bound on how many can fit.
_MIN_VALUE_SIZE = {vtype: struct.calcsize(fmt) for vtype, fmt in _SCALAR_FORMATS.items()}
_MIN_VALUE_SIZE[GGUFValueType.STRING] = 8  # u64 length, empty string
_MIN_VALUE_SIZE[GGUFValueType.ARRAY] = 12  # u32 item type + u64 count, empty array

# Element dtypes for the types `GGUFFile.array` returns as typed views (BF16 as its raw uint16).
_TYPED_VIEW_DTYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.BF16: np.dtype("<u2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


class GGUFError(ValueError):
    """A GGUF file that cannot be read: the message names the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor of a GGUF file: where its bytes are and how to interpret them."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # row-major (numpy) order: GGUF `ne` reversed
    offset: int  # absolute offset in the file
    nbytes: int
    _file: "GGUFFile" = field(repr=False)

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)][0]

    @property
    def raw(self) -> np.ndarray:
        """Zero-copy, read-only uint8 view of exactly this tensor's bytes."""
        return self._file._bytes(self.offset, self.nbytes)

    def rows_view(self) -> np.ndarray:
        """The bytes as (rows, row_bytes): rows = product of all but the innermost dimension."""
        n_rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        if n_rows == 0:
            return self.raw.reshape(0, 0)
        return self.raw.reshape(n_rows, self.nbytes // n_rows)


class _Cursor:
    """Sequential little-endian reads over the file header, each checked against the end of file."""

    def __init__(self, gguf: "GGUFFile", buf: memoryview):
        self._gguf = gguf
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining():
            raise self._gguf._error(
                f"{what} needs {n} bytes at offset {self.pos}, but only {self.remaining()} remain (truncated or corrupt file)"
            )

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar("I", what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", what)

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        self.need(length, f"{what} ({length} bytes)")
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise self._gguf._error(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        nbytes = count * dtype.itemsize
        self.need(nbytes, what)
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += nbytes
        return values


class GGUFFile:
    """A parsed GGUF or PowerInfer GGUF file.

    Attributes: `path`, `magic` ("GGUF" or "PWRI"), `is_powerinfer`, `version`, `alignment`,
    `data_offset`, `file_size`, `metadata` (key -> Python value; numeric arrays as numpy arrays,
    string arrays as lists), `metadata_types` (key -> (GGUFValueType, array item type or None)),
    `tensors` (name -> TensorInfo, in file order).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mm: np.memmap | None = None
        self._private: np.ndarray | None = None  # the writable in-memory copy (read_into_memory)
        try:
            self.file_size = os.path.getsize(self.path)
        except OSError as exc:
            raise GGUFError(self.path, f"cannot open: {exc.strerror or exc}") from None
        if self.file_size < 24:
            raise self._error(f"too small to be a GGUF file ({self.file_size} bytes; the header alone is 24)")
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise GGUFError(self.path, f"cannot map the file: {exc}") from None
        buf = memoryview(self._mm)
        try:
            self._parse(_Cursor(self, buf))
        except BaseException:
            self.close()
            raise
        finally:
            buf.release()

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        return cls(path)

    def prefetch(self) -> str:
        """Make the mapped file resident before decoding (llama.cpp advises MADV_WILLNEED for the same
        reason: otherwise the first touch of each page -- a new token's embedding row, a neuron's rows
        the first time it fires -- is a disk read in the middle of a decode step), in 2 MiB pages
        where the kernel can (page_cache.py says why and how). Returns what was done."""
        raw = getattr(self._mm, "_mmap", None)
        if raw is None or not isinstance(self._mm, np.memmap):
            return "none"
        return page_cache.make_resident(raw, self._mm.ctypes.data, self.file_size, self.path)

    def read_into_memory(self, chunk_bytes: int = 64 << 20) -> None:
        """Back every tensor view handed out from now on by one private in-memory copy of the file
        instead of the shared mapping (llama.cpp's --no-mmap). The copy is anonymous memory, which
        numpy advises as huge pages; the file's page cache is dropped afterwards, so the model is
        still in RAM once. The price is that the weights are private memory the kernel can no longer
        evict; since prefetch() maps the file in huge pages too, it is no faster. Call it before
        taking tensor views: views taken earlier keep pointing into the mapping."""
        if self._mm is None:
            raise self._error("file is closed")
        try:
            data = np.empty(self.file_size, np.uint8)
        except MemoryError:
            raise self._error(f"cannot read {self.file_size / 2**30:.1f} GiB into memory (out of memory); "
                              "map the file instead (use_mmap=True, the default)") from None
        view = memoryview(data)
        try:
            with open(self.path, "rb", buffering=0) as f:
                pos = 0
                while pos < self.file_size:
                    n = f.readinto(view[pos : pos + chunk_bytes])
                    if not n:
                        raise self._error(f"file shrank to {pos} bytes while being read (was {self.file_size})")
                    pos += n
                mapped, self._mm = self._mm, data
                del mapped  # unmapped (unless a view from before still holds it), so the advice below applies
                page_cache.drop_file_cache(f.fileno())  # else a second, evictable copy stays cached
        except OSError as exc:
            raise GGUFError(self.path, f"cannot read into memory: {exc.strerror or exc}") from None
        finally:
            view.release()
        self._private = data
        self._mm = data.view()
        self._mm.flags.writeable = False

    def _offset(self, base: np.ndarray | None, view: np.ndarray) -> int | None:
        if base is None:
            return None
        off = view.ctypes.data - base.ctypes.data
        return off if 0 <= off and off + view.nbytes <= base.nbytes else None

    def writable(self, view: np.ndarray) -> np.ndarray | None:
        """A writable uint8 alias of a tensor view when this file's bytes are a private in-memory copy
        (read_into_memory), so the view can be converted in place; None for the shared mapping."""
        off = self._offset(self._private, view)
        return None if off is None else self._private[off: off + view.nbytes]

    def release(self, view: np.ndarray) -> bool:
        """Drop this process's pages of the mapping under a view whose bytes will not be read again
        (a tensor copied elsewhere), so the weights stay resident once. The file's page cache keeps
        them (evictable); a later read would fault them back in. Whole pages inside the view only."""
        raw = getattr(self._mm, "_mmap", None) if isinstance(self._mm, np.memmap) else None
        off = self._offset(self._mm, view) if raw is not None else None
        if off is None or not hasattr(mmap, "MADV_DONTNEED"):
            return False
        page = mmap.PAGESIZE
        start, stop = -(-off // page) * page, (off + view.nbytes) // page * page
        if stop <= start:
            return False
        raw.madvise(mmap.MADV_DONTNEED, start, stop - start)
        return True

    def close(self) -> None:
        """Drop this object's mapping. Views handed out earlier stay valid (numpy keeps them alive)."""
        self._mm = None
        self._private = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, magic={self.magic}, arch={self.arch!r}, tensors={len(self.tensors)})"

    @property
    def is_powerinfer(self) -> bool:
        return self.magic == "PWRI"

    @property
    def arch(self) -> str | None:
        return self.metadata.get("general.architecture")

    # ---- tensor access -------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._error(f"no tensor named {name!r}") from None

    def array(self, name: str) -> np.ndarray:
        """Zero-copy, read-only view of a tensor in its row-major shape.

        F32/F16/F64/I8/I16/I32/I64 come typed, BF16 as uint16 (its raw bits), quantized types as raw
        bytes shaped (*shape[:-1], row_bytes) like `gguf.GGUFReader`."""
        info = self.tensor(name)
        ggml_type = GGMLQuantizationType(info.ggml_type)
        dtype = _TYPED_VIEW_DTYPES.get(ggml_type)
        if dtype is None:
            return info.rows_view().reshape(*info.shape[:-1], -1) if info.nbytes else info.raw
        return info.raw.view(dtype).reshape(info.shape)

    def dequantize(self, name: str) -> np.ndarray:
        """A float32 copy of any tensor type `gguf.quants` can decode (a convenience for tests and tools)."""
        from gguf.quants import dequantize

        info = self.tensor(name)
        ggml_type = GGMLQuantizationType(info.ggml_type)
        if ggml_type in _TYPED_VIEW_DTYPES and ggml_type != GGMLQuantizationType.BF16:
            return self.array(name).astype(np.float32)
        try:
            values = dequantize(info.rows_view(), ggml_type)
        except NotImplementedError:
            raise self._error(f"tensor {name!r}: cannot dequantize type {ggml_type.name}") from None
        return np.asarray(values, dtype=np.float32).reshape(info.shape)

    def _bytes(self, offset: int, nbytes: int) -> np.ndarray:
        if self._mm is None:
            raise self._error("file is closed")
        return self._mm[offset : offset + nbytes].view(np.ndarray)

    def _error(self, problem: str) -> GGUFError:
        return GGUFError(self.path, problem)

    # ---- parsing -------------------------------------------------------------------------------

    def _parse(self, cur: _Cursor) -> None:
        magic = bytes(cur.buf[0:4])
        if magic not in (GGUF_MAGIC_BYTES, POWERINFER_MAGIC_BYTES):
            raise self._error(f"not a GGUF file: magic {magic!r}, expected b'GGUF' or b'PWRI'")
        self.magic = magic.decode("ascii")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian GGUF file? only little-endian is supported)" if self.version & 0xFFFF == 0 else ""
            raise self._error(f"unsupported GGUF version {self.version}; supported: 2, 3{hint}")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata key/value count")
        # Smallest possible encodings: key (u64 len + 0 bytes) + u32 type + 1-byte value;
        # tensor info (u64 len + u32 n_dims + 1 dim + u32 type + u64 offset).
        if n_kv * (8 + 4 + 1) > cur.remaining():
            raise self._error(f"metadata count {n_kv} cannot fit in the {cur.remaining()} bytes left in the file")
        if n_tensors * (8 + 4 + 8 + 4 + 8) > cur.remaining():
            raise self._error(f"tensor count {n_tensors} cannot fit in the {cur.remaining()} bytes left in the file")

        for index in range(n_kv):
            key = cur.string(f"metadata key #{index}")
            if key in self.metadata:
                raise self._error(f"duplicate metadata key {key!r}")
            raw_type = cur.u32(f"type of metadata key {key!r}")
            vtype = self._value_type(raw_type, f"metadata key {key!r}")
            value, sub_type = self._read_value(cur, vtype, key, depth=0)
            self.metadata[key] = value
            self.metadata_types[key] = (vtype, sub_type)

        self.alignment = self._alignment()

        pending: list[tuple[str, int, tuple[int, ...], int, int]] = []
        seen: set[str] = set()
        for index in range(n_tensors):
            name = cur.string(f"name of tensor #{index}")
            if name in seen:
                raise self._error(f"duplicate tensor name {name!r}")
            seen.add(name)
            n_dims = cur.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise self._error(f"tensor {name!r} has {n_dims} dimensions; expected 1 to {GGML_MAX_DIMS}")
            ne = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
            raw_type = cur.u32(f"type of tensor {name!r}")
            rel_offset = cur.u64(f"data offset of tensor {name!r}")
            pending.append((name, raw_type, tuple(ne), rel_offset, index))

        self.data_offset = _align_up(cur.pos, self.alignment)
        data_size = max(self.file_size - self.data_offset, 0)
        for name, raw_type, ne, rel_offset, _ in pending:
            ggml_type = self._tensor_type(raw_type, name)
            nbytes = self._tensor_nbytes(name, ggml_type, ne)
            if rel_offset % self.alignment:
                raise self._error(f"tensor {name!r}: data offset {rel_offset} is not a multiple of the alignment {self.alignment}")
            if rel_offset > data_size or nbytes > data_size - rel_offset:
                raise self._error(
                    f"tensor {name!r}: data [{rel_offset}, {rel_offset + nbytes}) runs past the end of the "
                    f"data section ({data_size} bytes; truncated file?)"
                )
            self.tensors[name] = TensorInfo(
                name=name,
                ggml_type=int(ggml_type),
                shape=tuple(reversed(ne)),
                offset=self.data_offset + rel_offset,
                nbytes=nbytes,
                _file=self,
            )
        self._check_overlaps()

    def _read_value(self, cur: _Cursor, vtype: GGUFValueType, key: str, depth: int) -> tuple[Any, GGUFValueType | None]:
        what = f"value of metadata key {key!r}"
        if vtype == GGUFValueType.STRING:
            return cur.string(what), None
        if vtype == GGUFValueType.BOOL:
            byte = cur.scalar("B", what)
            if byte > 1:
                raise self._error(f"metadata key {key!r}: boolean byte is {byte}, expected 0 or 1")
            return bool(byte), None
        if vtype in _SCALAR_FORMATS:
            return cur.scalar(_SCALAR_FORMATS[vtype], what), None

        # ARRAY: u32 item type, u64 count, items
        item_type = self._value_type(cur.u32(f"item type of array {key!r}"), f"items of array {key!r}")
        count = cur.u64(f"length of array {key!r}")
        if count * _MIN_VALUE_SIZE[item_type] > cur.remaining():
            raise self._error(
                f"metadata key {key!r}: array of {count} {item_type.name} items cannot fit in the "
                f"{cur.remaining()} bytes left in the file"
            )
        if item_type == GGUFValueType.BOOL:
            values = cur.array(np.dtype("u1"), count, what)
            if values.size and values.max() > 1:
                raise self._error(f"metadata key {key!r}: boolean array holds bytes other than 0 and 1")
            return values.astype(np.bool_), item_type
        if item_type in _SCALAR_DTYPES:
            return cur.array(_SCALAR_DTYPES[item_type], count, what), item_type
        if item_type == GGUFValueType.STRING:
            return [cur.string(f"item {i} of array {key!r}") for i in range(count)], item_type
        if depth + 1 >= MAX_ARRAY_NESTING:
            raise self._error(f"metadata key {key!r}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
        items = []
        for _ in range(count):
            inner_type = self._value_type(GGUFValueType.ARRAY, key)
            items.append(self._read_value(cur, inner_type, key, depth + 1)[0])
        return items, item_type

    def _value_type(self, raw: int, what: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._error(f"{what}: unknown value type {raw}") from None

    def _tensor_type(self, raw: int, name: str) -> GGMLQuantizationType:
        try:
            ggml_type = GGMLQuantizationType(raw)
        except ValueError:
            ggml_type = None
        if ggml_type is None or ggml_type not in GGML_QUANT_SIZES:
            raise self._error(f"tensor {name!r}: unknown ggml type {raw}")
        return ggml_type

    def _tensor_nbytes(self, name: str, ggml_type: GGMLQuantizationType, ne: tuple[int, ...]) -> int:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if ne[0] % block_size:
            raise self._error(
                f"tensor {name!r}: row length {ne[0]} is not a multiple of the {ggml_type.name} block size {block_size}"
            )
        n_elements = 1
        for dim in ne:
            n_elements *= dim
        if n_elements >= 1 << 63:
            raise self._error(f"tensor {name!r}: element count overflows ({' x '.join(map(str, ne))})")
        return n_elements // block_size * type_size

    def _alignment(self) -> int:
        key = "general.alignment"
        if key not in self.metadata:
            return GGUF_DEFAULT_ALIGNMENT
        vtype, _ = self.metadata_types[key]
        value = self.metadata[key]
        if vtype != GGUFValueType.UINT32:
            raise self._error(f"{key} must be a UINT32, found {vtype.name}")
        if value == 0 or value & (value - 1):
            raise self._error(f"{key} = {value} is not a power of two")
        return value

    def _check_overlaps(self) -> None:
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, prev_end, prev_name), (start, _, name) in zip(spans, spans[1:]):
            if start < prev_end:
                raise self._error(f"tensor {name!r} overlaps tensor {prev_name!r} (starts at {start}, before {prev_end})")


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
