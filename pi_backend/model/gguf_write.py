"""Write GGUF and PowerInfer GGUF files with the `gguf` package's own writer.

PowerInfer files are ordinary GGUF v3 files whose magic reads `PWRI`: we write with `gguf.GGUFWriter`
and patch the four magic bytes afterwards, so the layout is exactly what llama.cpp's tools produce.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.quants import quantize

from .gguf_file import GGUF_MAGIC_BYTES, POWERINFER_MAGIC_BYTES

__all__ = [
    "TypedValue",
    "EncodedTensor",
    "WEIGHT_TYPES",
    "parse_weight_type",
    "encode_tensor",
    "choose_tensor_type",
    "write_gguf",
    "write_model",
    "set_magic",
    "typed_metadata",
]

# The weight types the model writer produces (what gguf.quants can encode and our kernels target).
WEIGHT_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}
_FILE_TYPES = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
}
_NUMPY_VALUE_TYPES = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
    np.dtype(np.bool_): GGUFValueType.BOOL,
}


class TypedValue(NamedTuple):
    """A metadata value with an explicit GGUF type (llama.cpp checks types strictly: u32 vs i32 matters)."""

    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


class EncodedTensor(NamedTuple):
    """Tensor data ready for the file: typed array (F32/F16/...) or raw quantized bytes (uint8)."""

    data: np.ndarray
    ggml_type: GGMLQuantizationType


def parse_weight_type(weight_type: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    if isinstance(weight_type, str):
        try:
            return WEIGHT_TYPES[weight_type.lower()]
        except KeyError:
            raise ValueError(f"unknown weight type {weight_type!r}; choose from {sorted(WEIGHT_TYPES)}") from None
    ggml_type = GGMLQuantizationType(weight_type)
    if ggml_type not in WEIGHT_TYPES.values():
        raise ValueError(f"unsupported weight type {ggml_type.name}; choose from {sorted(WEIGHT_TYPES)}")
    return ggml_type


def encode_tensor(array: np.ndarray, ggml_type: str | int | GGMLQuantizationType) -> EncodedTensor:
    """Convert a float array (row-major, numpy order) to `ggml_type` with `gguf.quants.quantize`."""
    ggml_type = parse_weight_type(ggml_type)
    array = np.ascontiguousarray(array, dtype=np.float32)
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    if array.shape[-1] % block_size:
        raise ValueError(f"row length {array.shape[-1]} is not a multiple of the {ggml_type.name} block size {block_size}")
    return EncodedTensor(np.ascontiguousarray(quantize(array, ggml_type)), ggml_type)


def choose_tensor_type(shape: tuple[int, ...], weight_type: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """The type llama.cpp's converter/quantizer would give a tensor of this shape.

    1-D tensors (norms, biases) stay F32; a quantized type whose block does not divide the row
    length falls back to F16 (llama.cpp also falls back for such tensors rather than failing)."""
    wanted = parse_weight_type(weight_type)
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    if shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        return GGMLQuantizationType.F16
    return wanted


def _infer_value(value: Any) -> TypedValue:
    if isinstance(value, TypedValue):
        return value
    if isinstance(value, (bool, np.bool_)):
        return TypedValue(bool(value), GGUFValueType.BOOL)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if 0 <= value < 1 << 32:
            return TypedValue(value, GGUFValueType.UINT32)
        if -(1 << 31) <= value < 0:
            return TypedValue(value, GGUFValueType.INT32)
        return TypedValue(value, GGUFValueType.UINT64 if value > 0 else GGUFValueType.INT64)
    if isinstance(value, (float, np.floating)):
        return TypedValue(float(value), GGUFValueType.FLOAT32)
    if isinstance(value, str):
        return TypedValue(value, GGUFValueType.STRING)
    if isinstance(value, np.ndarray):
        if value.dtype not in _NUMPY_VALUE_TYPES:
            raise ValueError(f"no GGUF array type for numpy dtype {value.dtype}")
        return TypedValue(value.tolist(), GGUFValueType.ARRAY, _NUMPY_VALUE_TYPES[value.dtype])
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("GGUFWriter cannot write an empty array")
        if all(isinstance(v, str) for v in value):
            return TypedValue(list(value), GGUFValueType.ARRAY, GGUFValueType.STRING)
        if all(isinstance(v, (bool, np.bool_)) for v in value):
            return TypedValue([bool(v) for v in value], GGUFValueType.ARRAY, GGUFValueType.BOOL)
        if all(isinstance(v, (int, np.integer)) for v in value):
            return TypedValue([int(v) for v in value], GGUFValueType.ARRAY, GGUFValueType.INT32)
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            return TypedValue([float(v) for v in value], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    raise ValueError(f"cannot infer a GGUF type for {type(value).__name__} value {value!r}")


def _add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    typed = _infer_value(value)
    payload = typed.value
    if isinstance(payload, np.ndarray):
        payload = payload.tolist()  # GGUFWriter packs Python sequences only
    writer.add_key_value(key, payload, typed.vtype, typed.sub_type)


def typed_metadata(gguf_file, prefix: str = "") -> dict[str, TypedValue]:
    """Metadata of an open GGUFFile whose keys start with `prefix`, with their original types
    (so that copying e.g. `tokenizer.ggml.*` into a new file keeps u32 as u32)."""
    out = {}
    for key, value in gguf_file.metadata.items():
        if key.startswith(prefix):
            vtype, sub_type = gguf_file.metadata_types[key]
            out[key] = TypedValue(value, vtype, sub_type)
    return out


def write_gguf(
    path: str | os.PathLike,
    arch: str,
    metadata: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray | EncodedTensor],
    *,
    powerinfer: bool = False,
    alignment: int | None = None,
) -> Path:
    """Write a GGUF v3 file (magic PWRI when `powerinfer`).

    `metadata` values are Python/numpy values (types inferred: int -> UINT32, float -> FLOAT32, ...) or
    `TypedValue`s. `tensors` map names to row-major numpy arrays (F32/F16/I32/... from the dtype) or to
    `EncodedTensor`s (quantized bytes from `encode_tensor`). Tensors are written in the given order."""
    path = Path(path)
    writer = GGUFWriter(path, arch)
    try:
        if alignment is not None:
            writer.add_custom_alignment(alignment)
        for key, value in metadata.items():
            if key == "general.architecture":
                if value != arch:
                    raise ValueError(f"metadata general.architecture={value!r} contradicts arch={arch!r}")
                continue
            _add_metadata(writer, key, value)
        for name, tensor in tensors.items():
            if isinstance(tensor, EncodedTensor):
                is_float = tensor.ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
                writer.add_tensor(name, tensor.data, raw_dtype=None if is_float else tensor.ggml_type)
            else:
                writer.add_tensor(name, np.ascontiguousarray(tensor))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    if powerinfer:
        set_magic(path, powerinfer=True)
    return path


def set_magic(path: str | os.PathLike, *, powerinfer: bool) -> None:
    """Patch a GGUF file's magic in place: `PWRI` (PowerInfer sparse execution) or `GGUF`."""
    with open(path, "r+b") as f:
        current = f.read(4)
        if current not in (GGUF_MAGIC_BYTES, POWERINFER_MAGIC_BYTES):
            raise ValueError(f"{os.fspath(path)}: not a GGUF file (magic {current!r})")
        f.seek(0)
        f.write(POWERINFER_MAGIC_BYTES if powerinfer else GGUF_MAGIC_BYTES)


def write_model(
    path: str | os.PathLike,
    arch: str,
    metadata: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    *,
    weight_type: str | int | GGMLQuantizationType = "f16",
    type_overrides: Mapping[str, str | int | GGMLQuantizationType] | None = None,
    powerinfer: bool = False,
    alignment: int | None = None,
) -> Path:
    """Write a whole model from float weights (GGUF tensor names, row-major shapes).

    Each tensor gets `choose_tensor_type(shape, weight_type)` (1-D stays F32) unless `type_overrides`
    names it; `general.file_type` is set from `weight_type` unless the metadata already has it."""
    main_type = parse_weight_type(weight_type)
    overrides = {name: parse_weight_type(t) for name, t in (type_overrides or {}).items()}
    unknown = set(overrides) - set(weights)
    if unknown:
        raise ValueError(f"type_overrides names tensors that are not in weights: {sorted(unknown)}")
    encoded = {}
    for name, array in weights.items():
        ggml_type = overrides.get(name) or choose_tensor_type(np.shape(array), main_type)
        try:
            encoded[name] = encode_tensor(array, ggml_type)
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from None
    full_metadata = dict(metadata)
    full_metadata.setdefault("general.file_type", TypedValue(int(_FILE_TYPES[main_type]), GGUFValueType.UINT32))
    if main_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        full_metadata.setdefault("general.quantization_version", TypedValue(2, GGUFValueType.UINT32))
    return write_gguf(path, arch, full_metadata, encoded, powerinfer=powerinfer, alignment=alignment)
