"""Activation statistics: torch's .pt format read and written without torch (and without pickle's code execution)."""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pi_backend.model.activation_stats import (
    ActivationFileError,
    activation_file_name,
    load_activation_dir,
    load_activation_file,
    read_torch_tensor,
    save_activation_tensor,
)

DATA = Path(__file__).resolve().parent / "data"


def _torch():
    return pytest.importorskip("torch")


# ---- real torch.save output, checked in ----------------------------------------------------------


def test_reads_real_torch_float32_file():
    values = read_torch_tensor(DATA / "torch_activation_f32.pt")
    expected = np.load(DATA / "torch_activation_f32.npy")
    assert values.dtype == np.float32 and values.shape == (64,)
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(load_activation_file(DATA / "torch_activation_f32.pt", n_ff=64), expected)


def test_reads_real_torch_strided_float16_view():
    values = read_torch_tensor(DATA / "torch_strided_f16.pt")
    expected = np.load(DATA / "torch_strided_f16.npy")
    assert values.dtype == np.float16 and values.shape == (13,)
    np.testing.assert_array_equal(values, expected)
    # the file stores the whole 40-element storage; the tensor is a view into it
    with zipfile.ZipFile(DATA / "torch_strided_f16.pt") as z:
        assert z.getinfo("torch_strided_f16/data/0").file_size == 40 * 2


# ---- our writer --------------------------------------------------------------------------------


def test_writer_round_trip_and_layout(tmp_path):
    values = np.random.default_rng(0).random(300).astype(np.float32)
    path = save_activation_tensor(tmp_path / "activation_7.pt", values)
    np.testing.assert_array_equal(read_torch_tensor(path), values)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert names[0] == "activation_7/data.pkl"
        for record in ("data.pkl", "byteorder", "data/0", "version"):
            assert f"activation_7/{record}" in names
        assert z.read("activation_7/byteorder") == b"little"
        assert z.read("activation_7/version") == b"3\n"
        assert z.read("activation_7/data/0") == values.astype("<f4").tobytes()
        pkl = z.read("activation_7/data.pkl")
        assert pkl[:2] == b"\x80\x02"  # protocol 2, as torch writes
        raw = path.read_bytes()
        for info in z.infolist():  # every record's data starts on a 64-byte boundary, like torch's
            name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0
            assert info.compress_type == zipfile.ZIP_STORED


def test_writer_rejects_non_1d(tmp_path):
    with pytest.raises(ValueError):
        save_activation_tensor(tmp_path / "x.pt", np.zeros((2, 2)))


# ---- hostile or wrong files --------------------------------------------------------------------


def _zip_with_pickle(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, root: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{root}/data.pkl", pkl)
        z.writestr(f"{root}/byteorder", b"little")
        for key, data in (storages or {}).items():
            z.writestr(f"{root}/data/{key}", data)
        z.writestr(f"{root}/version", b"3\n")
    return path


def _tensor_pickle(storage_type=b"FloatStorage", numel=4, offset=0, size=(4,), stride=(1,), rebuild=b"_rebuild_tensor_v2"):
    """A protocol-2 pickle shaped like torch's, with adjustable fields."""
    out = io.BytesIO()
    out.write(b"\x80\x02ctorch._utils\n" + rebuild + b"\n(")
    out.write(b"(X\x07\x00\x00\x00storagectorch\n" + storage_type + b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu")
    out.write(pickle.dumps(numel, 2)[2:-1] + b"tQ")
    out.write(pickle.dumps(offset, 2)[2:-1])
    out.write(pickle.dumps(tuple(size), 2)[2:-1])
    out.write(pickle.dumps(tuple(stride), 2)[2:-1])
    out.write(b"\x89ccollections\nOrderedDict\n)RtR.")
    return out.getvalue()


def test_crafted_pickle_matches_reader_expectations(tmp_path):
    # sanity check of the helper: a well-formed crafted file reads fine, with offset and stride
    data = np.arange(10, dtype="<f4").tobytes()
    path = _zip_with_pickle(tmp_path / "ok.pt", _tensor_pickle(numel=10, offset=1, size=(3,), stride=(3,)), {"0": data})
    np.testing.assert_array_equal(read_torch_tensor(path), [1, 4, 7])


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


class _FileWriter:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_refuses_to_execute_code(tmp_path):
    target = tmp_path / "created-by-pickle"
    for payload in (pickle.dumps(_Exploit(), 2), pickle.dumps(_FileWriter(str(target)), 2)):
        path = _zip_with_pickle(tmp_path / "evil.pt", payload)
        with pytest.raises(ActivationFileError, match="refusing to load global"):
            read_torch_tensor(path)
    assert not target.exists()


@pytest.mark.parametrize("rebuild", [b"_rebuild_parameter", b"_rebuild_qtensor"])
def test_refuses_other_torch_rebuilders(tmp_path, rebuild):
    path = _zip_with_pickle(tmp_path / "p.pt", _tensor_pickle(rebuild=rebuild), {"0": bytes(16)})
    with pytest.raises(ActivationFileError, match="refusing to load global torch._utils"):
        read_torch_tensor(path)


def test_refuses_unknown_storage_type(tmp_path):
    path = _zip_with_pickle(tmp_path / "s.pt", _tensor_pickle(storage_type=b"ComplexFloatStorage"), {"0": bytes(32)})
    with pytest.raises(ActivationFileError, match="ComplexFloatStorage"):
        read_torch_tensor(path)


@pytest.mark.parametrize(
    "kwargs,storage_bytes,message",
    [
        (dict(numel=4, size=(5,), stride=(1,)), 16, "reads past its storage"),
        (dict(numel=4, offset=2, size=(2,), stride=(2,)), 16, "reads past its storage"),
        (dict(numel=4), 12, "holds 12 bytes, expected 4 x 4"),
        (dict(numel=2**40), 16, "holds 16 bytes"),
        (dict(numel=4, size=(2, 2), stride=(1,)), 16, "bad tensor geometry"),
    ],
)
def test_rejects_inconsistent_geometry(tmp_path, kwargs, storage_bytes, message):
    path = _zip_with_pickle(tmp_path / "g.pt", _tensor_pickle(**kwargs), {"0": bytes(storage_bytes)})
    with pytest.raises(ActivationFileError, match=message):
        read_torch_tensor(path)


def test_rejects_missing_storage_and_non_tensors(tmp_path):
    with pytest.raises(ActivationFileError, match="missing"):
        read_torch_tensor(_zip_with_pickle(tmp_path / "m.pt", _tensor_pickle()))
    with pytest.raises(ActivationFileError, match="holds a dict, not a tensor"):
        read_torch_tensor(_zip_with_pickle(tmp_path / "d.pt", pickle.dumps({"a": 1}, 2)))
    with pytest.raises(ActivationFileError, match="not a plain saved tensor"):
        read_torch_tensor(_zip_with_pickle(tmp_path / "t.pt", b"\x80\x02K"))  # truncated pickle


def test_rejects_non_zip_and_legacy_files(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(1, 2) + b"\0" * 100)  # pre-1.6 torch files are bare pickles
    with pytest.raises(ActivationFileError, match="legacy"):
        read_torch_tensor(legacy)
    with pytest.raises(ActivationFileError, match="no such file"):
        read_torch_tensor(tmp_path / "absent.pt")


def test_activation_file_checks(tmp_path):
    save_activation_tensor(tmp_path / "a.pt", [0.5, np.nan])
    with pytest.raises(ActivationFileError, match="NaN"):
        load_activation_file(tmp_path / "a.pt")
    save_activation_tensor(tmp_path / "b.pt", [0.5, -1.0])
    with pytest.raises(ActivationFileError, match="negative"):
        load_activation_file(tmp_path / "b.pt")
    save_activation_tensor(tmp_path / "c.pt", [0.5, 1.0])
    with pytest.raises(ActivationFileError, match="expected 3 values"):
        load_activation_file(tmp_path / "c.pt", n_ff=3)


# ---- directories -------------------------------------------------------------------------------


def _write_dir(directory: Path, n_layer: int, n_ff: int) -> list[np.ndarray]:
    directory.mkdir(exist_ok=True)
    stats = []
    for layer in range(n_layer):
        values = np.full(n_ff, float(layer), dtype=np.float32)  # each layer identifiable by its values
        values[layer % n_ff] += 0.5
        save_activation_tensor(directory / activation_file_name(layer), values)
        stats.append(values)
    return stats


def test_directory_sorted_numerically_not_as_strings(tmp_path):
    expected = _write_dir(tmp_path / "activation", 12, 16)
    (tmp_path / "activation" / "notes.txt").write_text("ignored")
    stats = load_activation_dir(tmp_path / "activation", n_layer=12, n_ff=16)
    assert len(stats) == 12
    for layer in range(12):  # string order would put activation_10 at index 2
        np.testing.assert_array_equal(stats[layer], expected[layer])


def test_directory_consistency_checks(tmp_path):
    d = tmp_path / "activation"
    _write_dir(d, 4, 8)
    with pytest.raises(ActivationFileError, match=r"missing layers \[4, 5\]"):
        load_activation_dir(d, n_layer=6)
    with pytest.raises(ActivationFileError, match=r"unexpected layers \[3\]"):
        load_activation_dir(d, n_layer=3)
    with pytest.raises(ActivationFileError, match="expected 9 values"):
        load_activation_dir(d, n_ff=9)
    (d / "activation_2.pt").unlink()
    with pytest.raises(ActivationFileError, match=r"missing layers \[2\]"):
        load_activation_dir(d)
    save_activation_tensor(d / "activation_2.pt", np.zeros(5))
    with pytest.raises(ActivationFileError, match="has 5 values but activation_0.pt has 8"):
        load_activation_dir(d)
    save_activation_tensor(d / "activation_02.pt", np.zeros(8))
    with pytest.raises(ActivationFileError, match="two files for layer 2"):
        load_activation_dir(d)
    with pytest.raises(ActivationFileError, match="no activation_"):
        load_activation_dir(tmp_path)
    with pytest.raises(ActivationFileError, match="not a directory"):
        load_activation_dir(tmp_path / "nope")


# ---- against torch itself, where installed --------------------------------------------------------


def test_torch_loads_our_files(tmp_path):
    torch = _torch()
    for n in (0, 1, 255, 70000):
        values = np.random.default_rng(n).random(n).astype(np.float32)
        path = save_activation_tensor(tmp_path / f"activation_{n}.pt", values)
        for mmap in (False, True):
            tensor = torch.load(path, weights_only=True, mmap=mmap)
            assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (n,)
            np.testing.assert_array_equal(tensor.numpy(), values)


def test_our_pickle_is_byte_identical_to_torch(tmp_path):
    torch = _torch()
    values = np.random.default_rng(1).random(11008).astype(np.float32)
    ours = save_activation_tensor(tmp_path / "activation_3.pt", values)
    (tmp_path / "ref").mkdir()
    torch.save(torch.from_numpy(values), tmp_path / "ref" / "activation_3.pt")
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(tmp_path / "ref" / "activation_3.pt") as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            if not name.endswith("serialization_id"):
                assert a.read(name) == b.read(name), name


def test_we_read_what_torch_writes(tmp_path):
    torch = _torch()
    g = torch.Generator().manual_seed(0)
    base = torch.rand(6, 10, generator=g)
    cases = {
        "f32": torch.rand(33, generator=g),
        "f64": torch.rand(5, generator=g, dtype=torch.float64),
        "f16_view": base.half()[2:, 1::3],
        "bf16": torch.rand(9, generator=g).bfloat16(),
        "transposed": base.t(),
        "scalar": torch.tensor(2.5),
        "int64_counts": torch.randint(0, 1000, (17,), generator=g),
        "bool": torch.rand(8, generator=g) > 0.5,
        "empty": torch.zeros(0),
    }
    for name, tensor in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(tensor, path)
        ours = read_torch_tensor(path)
        reference = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert ours.shape == reference.shape, name
        assert ours.dtype == reference.dtype, name
        np.testing.assert_array_equal(ours, reference, err_msg=name)


def test_torch_activation_dir_round_trip(tmp_path):
    torch = _torch()
    d = tmp_path / "activation"
    d.mkdir()
    expected = [torch.rand(32, generator=torch.Generator().manual_seed(i)) for i in range(11)]
    for i, t in enumerate(expected):
        torch.save(t, d / f"activation_{i}.pt")
    stats = load_activation_dir(d, n_layer=11, n_ff=32)
    for i in range(11):
        np.testing.assert_array_equal(stats[i], expected[i].numpy())
