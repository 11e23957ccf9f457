"""PowerInfer's activation statistics (`activation/activation_{i}.pt`), read and written without torch.

A `.pt` file is a zip: `<root>/data.pkl` (a pickle that rebuilds the tensor), `<root>/data/<key>`
(raw storage bytes), `<root>/byteorder`, `<root>/version`. Unpickling it with plain `pickle` runs
whatever code the file names, so the reader uses an unpickler that resolves only the three globals a
saved tensor needs, to inert stand-ins, and reads the storage bytes itself.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "ActivationFileError",
    "read_torch_tensor",
    "load_activation_file",
    "load_activation_dir",
    "save_activation_tensor",
    "activation_file_name",
]

# torch's legacy storage classes (what torch.save still names in the pickle) -> element dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",  # widened to float32 after reading
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
_MAX_PICKLE_BYTES = 1 << 20  # a tensor's data.pkl is ~150 bytes; anything huge is not a tensor file
_RECORD_ALIGNMENT = 64  # torch aligns every record's data so storages can be memory-mapped
_ACTIVATION_NAME = re.compile(r"activation_(\d+)\.pt")


class ActivationFileError(ValueError):
    """A `.pt` file that is not a plain saved tensor, or an activation directory that is inconsistent."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


# ---- reading ---------------------------------------------------------------------------------------


class _StorageType:
    """Stand-in for `torch.FloatStorage` etc.: only remembers the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype


class _Storage:
    __slots__ = ("values",)

    def __init__(self, values: np.ndarray):
        self.values = values


class _Tensor:
    """Stand-in for a rebuilt tensor. Refuses pickle's BUILD so a crafted file cannot poke at it."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):
        raise pickle.UnpicklingError("unexpected state for a tensor")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called without a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"bad tensor geometry: size {size!r}, stride {stride!r}")
    if not all(type(v) is int and v >= 0 for v in (storage_offset, *size, *stride)):
        raise pickle.UnpicklingError(f"bad tensor geometry: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    values = storage.values
    n_elements = int(np.prod(size, dtype=np.int64)) if size else 1
    if n_elements:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= values.size:
            raise pickle.UnpicklingError(
                f"tensor of size {size} with stride {stride} at offset {storage_offset} reads past its "
                f"storage of {values.size} elements"
            )
    item = values.itemsize
    view = np.lib.stride_tricks.as_strided(
        values[storage_offset:] if n_elements else values[:0],
        shape=size,
        strides=tuple(s * item for s in stride),
        writeable=False,
    )
    return _Tensor(np.array(view))  # copy: detached from the zip's bytes, contiguous


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, load_storage):
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only plain tensors are allowed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        if not (isinstance(key, str) and key.isdigit() and type(numel) is int and numel >= 0):
            raise pickle.UnpicklingError(f"bad storage reference: key {key!r}, numel {numel!r}")
        return self._load_storage(storage_type.dtype, key, numel)


def read_torch_tensor(path: str | os.PathLike) -> np.ndarray:
    """Read a tensor saved by `torch.save(tensor, path)` as a numpy array (BF16 widened to float32).

    Honours dtype, byte order, storage offset, size and stride. Executes no code from the file."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ActivationFileError(path, "no such file") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ActivationFileError(
            path, f"not a torch zip archive ({exc}); files from torch < 1.6 (legacy format) are not supported"
        ) from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ActivationFileError(path, f"expected exactly one <root>/data.pkl in the archive, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = archive.read(root + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ActivationFileError(path, f"unknown byteorder record {byteorder!r}")
        endian = "<" if byteorder == "little" else ">"
        pkl_info = archive.getinfo(pickles[0])
        if pkl_info.file_size > _MAX_PICKLE_BYTES:
            raise ActivationFileError(path, f"data.pkl is {pkl_info.file_size} bytes; a saved tensor's is tiny")

        def load_storage(dtype_code: str, key: str, numel: int) -> _Storage:
            record = f"{root}data/{key}"
            try:
                info = archive.getinfo(record)
            except KeyError:
                raise pickle.UnpicklingError(f"storage record {record!r} is missing") from None
            dtype = np.dtype(dtype_code).newbyteorder(endian) if dtype_code not in ("u1", "i1", "?") else np.dtype(dtype_code)
            expected = numel * dtype.itemsize
            if info.compress_type != zipfile.ZIP_STORED:
                raise pickle.UnpicklingError(f"storage record {record!r} is compressed; torch stores storages uncompressed")
            if info.file_size != expected:
                raise pickle.UnpicklingError(
                    f"storage record {record!r} holds {info.file_size} bytes, expected {numel} x {dtype.itemsize}"
                )
            values = np.frombuffer(archive.read(record), dtype=dtype)
            if dtype_code == "u2":  # bfloat16: the high half of a float32
                values = (values.astype(np.uint32) << 16).view(np.float32)
            return _Storage(values.astype(values.dtype.newbyteorder("=")))

        try:
            result = _TensorUnpickler(archive.read(pickles[0]), load_storage).load()
        except ActivationFileError:
            raise
        except Exception as exc:  # anything a crafted pickle can provoke
            raise ActivationFileError(path, f"not a plain saved tensor: {exc}") from None
    if not isinstance(result, _Tensor):
        raise ActivationFileError(path, f"the file holds a {type(result).__name__}, not a tensor")
    return result.array


def load_activation_file(path: str | os.PathLike, n_ff: int | None = None) -> np.ndarray:
    """One layer's activation statistics as a 1-D float32 array (finite, non-negative)."""
    values = read_torch_tensor(path)
    if values.ndim != 1:
        raise ActivationFileError(path, f"expected a 1-D tensor, found shape {values.shape}")
    if n_ff is not None and values.shape[0] != n_ff:
        raise ActivationFileError(path, f"expected {n_ff} values (n_ff), found {values.shape[0]}")
    values = values.astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise ActivationFileError(path, "holds NaN or infinite values")
    if values.size and values.min() < 0:
        raise ActivationFileError(path, f"holds negative values (min {values.min()}); expected frequencies or counts")
    return values


def load_activation_dir(path: str | os.PathLike, n_layer: int | None = None, n_ff: int | None = None) -> list[np.ndarray]:
    """All `activation_{i}.pt` files of a directory, in NUMERIC layer order.

    (PowerInfer sorts these names as strings: 0, 1, 10, 11, ..., 2 -- handing layers another
    layer's statistics. Here layer i is always activation_i.pt.) The set must be exactly 0..n-1,
    n = `n_layer` when given, and all files must have the same length (`n_ff` when given)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ActivationFileError(directory, "not a directory")
    by_layer: dict[int, Path] = {}
    for entry in directory.iterdir():
        match = _ACTIVATION_NAME.fullmatch(entry.name)
        if not match:
            continue
        layer = int(match.group(1))
        if layer in by_layer:
            raise ActivationFileError(directory, f"two files for layer {layer}: {by_layer[layer].name} and {entry.name}")
        by_layer[layer] = entry
    if not by_layer:
        raise ActivationFileError(directory, "no activation_<layer>.pt files")
    count = n_layer if n_layer is not None else max(by_layer) + 1
    missing = sorted(set(range(count)) - set(by_layer))
    extra = sorted(set(by_layer) - set(range(count)))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing layers {missing}")
        if extra:
            problems.append(f"unexpected layers {extra} (n_layer = {count})")
        raise ActivationFileError(directory, "; ".join(problems))
    stats = []
    for layer in range(count):
        values = load_activation_file(by_layer[layer], n_ff)
        if stats and values.shape != stats[0].shape:
            raise ActivationFileError(
                by_layer[layer], f"has {values.shape[0]} values but activation_0.pt has {stats[0].shape[0]}"
            )
        stats.append(values)
    return stats


def activation_file_name(layer: int) -> str:
    return f"activation_{layer}.pt"


# ---- writing ---------------------------------------------------------------------------------------


def _pickle_int(value: int) -> bytes:
    """The opcode Python's protocol-2 pickler emits for an int (BININT1/BININT2/BININT/LONG1)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _pickle_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _tensor_pickle(numel: int) -> bytes:
    """data.pkl for a contiguous 1-D float32 tensor, byte for byte what torch.save writes."""
    memo = iter(range(256))

    def put() -> bytes:
        return b"q" + bytes([next(memo)])

    return b"".join([
        b"\x80\x02",
        b"ctorch._utils\n_rebuild_tensor_v2\n", put(),
        b"((", _pickle_str("storage"), put(),
        b"ctorch\nFloatStorage\n", put(),
        _pickle_str("0"), put(), _pickle_str("cpu"), put(), _pickle_int(numel),
        b"t", put(), b"Q",
        _pickle_int(0), _pickle_int(numel), b"\x85", put(), _pickle_int(1), b"\x85", put(),
        b"\x89", b"ccollections\nOrderedDict\n", put(), b")R", put(),
        b"t", put(), b"R", put(), b".",
    ])


def _write_aligned(archive: zipfile.ZipFile, fileobj, name: str, data: bytes) -> None:
    """Add a stored record whose data starts on a 64-byte boundary, padded like torch's writer
    (an extra field with id 'FB' filled with 'Z')."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_end = fileobj.tell() + 30 + len(name.encode("utf-8")) + 4  # local header + name + extra id/size
    padding = -header_end % _RECORD_ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    archive.writestr(info, data)


def save_activation_tensor(path: str | os.PathLike, values) -> Path:
    """Save a 1-D float32 tensor in torch's zip format, readable by `torch.load(path, weights_only=True)`.

    The archive root folder is the file name without its extension, as torch names it."""
    path = Path(path)
    array = np.ascontiguousarray(np.asarray(values, dtype="<f4"))
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {array.shape}")
    root = path.name.rsplit(".", 1)[0] if "." in path.name else path.name
    payload = array.tobytes()
    serialization_id = str(int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")).zfill(20)
    records = [
        ("data.pkl", _tensor_pickle(array.size)),
        (".format_version", b"1"),
        (".storage_alignment", str(_RECORD_ALIGNMENT).encode()),
        ("byteorder", b"little"),
        ("data/0", payload),
        ("version", b"3\n"),
        (".data/serialization_id", serialization_id.encode()),
    ]
    with open(path, "wb") as fileobj, zipfile.ZipFile(fileobj, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            _write_aligned(archive, fileobj, f"{root}/{name}", data)
    return path
