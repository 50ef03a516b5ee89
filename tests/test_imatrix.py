"""Importance matrices: load/save both llama.cpp formats losslessly, renumber for upscaled layers,
and reproduce what llama-quantize hands to the quantizer.

Oracles, independent of the code under test:
- ``write_legacy_like_imatrix_cpp`` / ``write_gguf_like_imatrix_cpp`` re-implement imatrix.cpp's
  save_imatrix_legacy / save_imatrix (+ gguf.cpp's layout) from raw statistics;
- gguf-py's GGUFWriter writes the GGUF form a second way;
- llama.cpp's own gguf writer and reader (libggml-base via ctypes) write the GGUF form a third
  way and check that our output is accepted;
- llama_model_quantize (llama-cpp-python) quantizes a tiny model with our arrays.
"""

from __future__ import annotations

import ctypes
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from upscaler.errors import ImatrixError, UpscaleError
from upscaler.quant.imatrix import (
    GgufEntry,
    ImatrixData,
    LegacyEntry,
    imatrix_metadata,
    load_imatrix,
    quantize_entries,
    remap_imatrix,
    save_imatrix,
)

# Raw statistics as imatrix.cpp accumulates them: name -> (sums of squared activations, counts).
Stats = dict[str, tuple[np.ndarray, list[int]]]
CHUNK_SIZE = 512
DATASET = "wiki.train.raw"


def make_stats(n_layer: int = 4, *, seed: int = 0, output: bool = True) -> Stats:
    """A small imatrix: dense tensors (one count) and a 4-expert tensor with one unused expert."""
    rng = np.random.default_rng(seed)
    stats: Stats = {}
    for i in range(n_layer):
        n_tok = CHUNK_SIZE * (3 + i)
        stats[f"blk.{i}.attn_q.weight"] = (rng.uniform(1, 50, 8).astype(np.float32), [n_tok])
        stats[f"blk.{i}.ffn_down.weight"] = (rng.uniform(1, 50, 16).astype(np.float32), [n_tok])
        exps = rng.uniform(1, 50, 4 * 8).astype(np.float32)
        exps[16:24] = 0  # expert 2 never routed to
        stats[f"blk.{i}.ffn_down_exps.weight"] = (exps, [n_tok // 2, n_tok // 4, 0, n_tok // 3])
    if output:
        stats["output.weight"] = (rng.uniform(1, 50, 8).astype(np.float32), [CHUNK_SIZE * 5])
    return stats


def write_legacy_like_imatrix_cpp(path: Path, stats: Stats, *, last_chunk: int, dataset: str) -> None:
    """imatrix.cpp save_imatrix_legacy, line by line (sorted names, skip all-zero entries)."""
    to_store = sorted(n for n, (_, c) in stats.items() if any(c))
    out = bytearray(struct.pack("<i", len(to_store)))
    for name in to_store:
        values, counts = stats[name]
        out += struct.pack("<i", len(name)) + name.encode()
        ncall = (max(counts) + (CHUNK_SIZE - 1)) // CHUNK_SIZE
        out += struct.pack("<ii", ncall, values.size)
        per = values.size // len(counts)
        tmp = np.empty(values.size, dtype=np.float32)
        for i in range(values.size):
            count = np.float32(counts[i // per])
            value = np.float32(values[i])
            if count == 0:
                value, count = np.float32(1), np.float32(1)
            tmp[i] = (value / count) * np.float32(ncall)
        out += tmp.astype("<f4").tobytes()
    out += struct.pack("<i", last_chunk) + struct.pack("<i", len(dataset.encode())) + dataset.encode()
    path.write_bytes(bytes(out))


def _gstr(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _pad_to(n: int, a: int = 32) -> int:
    return (n + a - 1) // a * a


def write_gguf_like_imatrix_cpp(path: Path, stats: Stats, *, datasets: list[str], last_chunk: int) -> None:
    """imatrix.cpp save_imatrix through gguf.cpp's gguf_write_out, written out by hand."""
    kv = [_gstr("general.type") + struct.pack("<I", 8) + _gstr("imatrix")]
    kv.append(_gstr("imatrix.datasets") + struct.pack("<IIQ", 9, 8, len(datasets)) + b"".join(map(_gstr, datasets)))
    kv.append(_gstr("imatrix.chunk_count") + struct.pack("<II", 4, last_chunk))
    kv.append(_gstr("imatrix.chunk_size") + struct.pack("<II", 4, CHUNK_SIZE))
    infos, blobs, offset = [], [], 0
    for name in sorted(stats):
        values, counts = stats[name]
        nmat = len(counts)
        for tname, ne, data in (
            (name + ".in_sum2", [values.size // nmat, nmat], values.astype("<f4").tobytes()),
            (name + ".counts", [1, nmat], np.asarray(counts, dtype="<f4").tobytes()),
        ):
            n_dims = 2 if ne[1] > 1 else 1  # ggml_n_dims
            infos.append(_gstr(tname) + struct.pack("<I", n_dims) + struct.pack(f"<{n_dims}q", *ne[:n_dims])
                         + struct.pack("<iQ", 0, offset))
            blobs.append(data + bytes(_pad_to(len(data)) - len(data)))
            offset += _pad_to(len(data))
    head = b"GGUF" + struct.pack("<Iqq", 3, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    path.write_bytes(head + bytes(_pad_to(len(head)) - len(head)) + b"".join(blobs))


def write_gguf_with_ggufwriter(path: Path, stats: Stats, *, datasets: list[str], last_chunk: int) -> None:
    """The same file through gguf-py, shaped like ggml writes it (trailing 1-dims dropped)."""
    w = GGUFWriter(path, arch="unused")
    w.kv_data[0].pop("general.architecture")  # GGUFWriter always adds it; imatrix files have none
    w.add_type("imatrix")
    w.add_key_value("imatrix.datasets", datasets, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_uint32("imatrix.chunk_count", last_chunk)
    w.add_uint32("imatrix.chunk_size", CHUNK_SIZE)
    for name in sorted(stats):
        values, counts = stats[name]
        nmat = len(counts)
        sums = values if nmat == 1 else values.reshape(nmat, -1)
        cnts = np.asarray(counts, dtype=np.float32).reshape((1,) if nmat == 1 else (nmat, 1))
        w.add_tensor(name + ".in_sum2", sums.astype(np.float32))
        w.add_tensor(name + ".counts", cnts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------- llama.cpp's gguf, via ctypes


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class LlamaGguf:
    """llama.cpp's gguf writer/reader from llama-cpp-python's bundled libggml-base."""

    def __init__(self) -> None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        for fn, res, args in [
            ("ggml_init", vp, [_InitParams]),
            ("ggml_free", None, [vp]),
            ("ggml_new_tensor_2d", vp, [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
            ("ggml_set_name", vp, [vp, cp]),
            ("ggml_get_data", vp, [vp]),
            ("gguf_init_empty", vp, []),
            ("gguf_free", None, [vp]),
            ("gguf_set_val_str", None, [vp, cp, cp]),
            ("gguf_set_arr_str", None, [vp, cp, ctypes.POINTER(cp), ctypes.c_size_t]),
            ("gguf_set_val_u32", None, [vp, cp, ctypes.c_uint32]),
            ("gguf_add_tensor", None, [vp, vp]),
            ("gguf_write_to_file", ctypes.c_bool, [vp, cp, ctypes.c_bool]),
            ("gguf_init_from_file", vp, [cp, _GgufInitParams]),
            ("gguf_get_n_tensors", ctypes.c_int64, [vp]),
        ]:
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        self.lib = lib

    def write_imatrix(self, path: Path, stats: Stats, *, datasets: list[str], last_chunk: int) -> None:
        """IMatrixCollector::save_imatrix, with the same gguf/ggml calls."""
        lib = self.lib
        ctx = lib.ggml_init(_InitParams(1 << 22, None, False))
        g = lib.gguf_init_empty()
        try:
            lib.gguf_set_val_str(g, b"general.type", b"imatrix")
            arr = (ctypes.c_char_p * max(1, len(datasets)))(*[d.encode() for d in datasets])
            lib.gguf_set_arr_str(g, b"imatrix.datasets", arr, len(datasets))
            lib.gguf_set_val_u32(g, b"imatrix.chunk_count", last_chunk)
            lib.gguf_set_val_u32(g, b"imatrix.chunk_size", CHUNK_SIZE)
            for name in sorted(stats):
                values, counts = stats[name]
                nmat = len(counts)
                for suffix, ne0, data in (
                    (".in_sum2", values.size // nmat, np.ascontiguousarray(values, dtype=np.float32)),
                    (".counts", 1, np.asarray(counts, dtype=np.float32)),
                ):
                    t = lib.ggml_new_tensor_2d(ctx, 0, ne0, nmat)
                    lib.ggml_set_name(t, (name + suffix).encode())
                    ctypes.memmove(lib.ggml_get_data(t), data.ctypes.data, data.nbytes)
                    lib.gguf_add_tensor(g, t)
            assert lib.gguf_write_to_file(g, str(path).encode(), False)
        finally:
            lib.gguf_free(g)
            lib.ggml_free(ctx)

    def accepts(self, path: Path) -> int | None:
        """Tensor count if gguf_init_from_file (with data) accepts the file, else None."""
        ctx = ctypes.c_void_p()
        g = self.lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(False, ctypes.pointer(ctx)))
        if not g:
            return None
        n = self.lib.gguf_get_n_tensors(g)
        self.lib.gguf_free(g)
        self.lib.ggml_free(ctx)
        return int(n)


@pytest.fixture(scope="module")
def llama_gguf() -> LlamaGguf:
    try:
        return LlamaGguf()
    except (ImportError, OSError, AttributeError) as e:  # pragma: no cover - depends on the install
        pytest.skip(f"llama.cpp's gguf library not usable: {e}")


WRITERS: dict[str, Callable[..., None]] = {
    "mirror": write_gguf_like_imatrix_cpp,
    "ggufwriter": write_gguf_with_ggufwriter,
}


@pytest.fixture
def stats() -> Stats:
    return make_stats()


@pytest.fixture
def legacy_file(tmp_path: Path, stats: Stats) -> Path:
    p = tmp_path / "imatrix.dat"
    write_legacy_like_imatrix_cpp(p, stats, last_chunk=7, dataset=DATASET)
    return p


@pytest.fixture
def gguf_file(tmp_path: Path, stats: Stats) -> Path:
    p = tmp_path / "imatrix.gguf"
    write_gguf_like_imatrix_cpp(p, stats, datasets=[DATASET, "code.txt"], last_chunk=7)
    return p


# --------------------------------------------------------------------------- load / save


def test_legacy_load_keeps_the_stored_values(legacy_file: Path, stats: Stats) -> None:
    data = load_imatrix(legacy_file)
    assert data.format == "dat"
    assert list(data.entries) == sorted(stats)
    assert data.datasets == ["wiki.train.raw"] and data.chunk_count == 7 and data.chunk_size is None
    e = data.entries["blk.2.ffn_down_exps.weight"]
    assert isinstance(e, LegacyEntry)
    counts = stats["blk.2.ffn_down_exps.weight"][1]
    assert e.ncall == -(-max(counts) // CHUNK_SIZE)
    assert e.values.dtype == np.float32 and e.values.shape == (32,)
    assert np.all(e.values[16:24] == np.float32(e.ncall))  # unused expert stored as 1 * ncall
    assert data.block_layers() == [0, 1, 2, 3]


def test_legacy_round_trip_is_byte_identical(legacy_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.dat"
    save_imatrix(load_imatrix(legacy_file), out)
    assert out.read_bytes() == legacy_file.read_bytes()


@pytest.mark.parametrize("trailer", [b"", struct.pack("<ii", 3, 0)])
def test_legacy_without_trailer_or_dataset_round_trips(tmp_path: Path, trailer: bytes) -> None:
    body = struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 2, 2) + struct.pack("<2f", 1, 2)
    src = tmp_path / "a.dat"
    src.write_bytes(body + trailer)
    data = load_imatrix(src)
    assert data.datasets == [] and data.chunk_count == (3 if trailer else None)
    save_imatrix(data, tmp_path / "b.dat")
    assert (tmp_path / "b.dat").read_bytes() == src.read_bytes()


def test_gguf_load_keeps_sums_counts_and_shapes(gguf_file: Path, stats: Stats) -> None:
    data = load_imatrix(gguf_file)
    assert data.format == "gguf"
    assert list(data.entries) == sorted(stats)
    assert data.datasets == ["wiki.train.raw", "code.txt"]
    assert (data.chunk_count, data.chunk_size, data.extra_kv) == (7, CHUNK_SIZE, {})
    dense = data.entries["blk.0.attn_q.weight"]
    exps = data.entries["blk.0.ffn_down_exps.weight"]
    assert isinstance(dense, GgufEntry) and isinstance(exps, GgufEntry)
    assert dense.in_sum2.shape == (8,) and dense.counts.shape == (1,)
    assert exps.in_sum2.shape == (4, 8) and exps.counts.shape == (4, 1)
    np.testing.assert_array_equal(exps.in_sum2.reshape(-1), stats["blk.0.ffn_down_exps.weight"][0])
    np.testing.assert_array_equal(exps.counts.reshape(-1), stats["blk.0.ffn_down_exps.weight"][1])


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_gguf_round_trip_is_byte_identical(writer: str, tmp_path: Path, stats: Stats) -> None:
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    WRITERS[writer](src, stats, datasets=["wiki.train.raw"], last_chunk=11)
    save_imatrix(load_imatrix(src), out)
    assert out.read_bytes() == src.read_bytes()


def test_independent_gguf_writers_agree(tmp_path: Path, stats: Stats) -> None:
    for name, write in WRITERS.items():
        write(tmp_path / f"{name}.gguf", stats, datasets=["d"], last_chunk=3)
    assert (tmp_path / "mirror.gguf").read_bytes() == (tmp_path / "ggufwriter.gguf").read_bytes()


def test_gguf_matches_llama_cpp_writer_and_is_accepted(tmp_path: Path, stats: Stats, llama_gguf: LlamaGguf) -> None:
    ref, ours = tmp_path / "llama.gguf", tmp_path / "ours.gguf"
    llama_gguf.write_imatrix(ref, stats, datasets=["wiki.train.raw"], last_chunk=9)
    data = load_imatrix(ref)
    save_imatrix(data, ours)
    assert ours.read_bytes() == ref.read_bytes()
    assert llama_gguf.accepts(ours) == 2 * len(stats)


def test_gguf_empty_datasets_and_extra_keys_survive(tmp_path: Path, stats: Stats, llama_gguf: LlamaGguf) -> None:
    src = tmp_path / "a.gguf"
    llama_gguf.write_imatrix(src, stats, datasets=[], last_chunk=0)
    data = load_imatrix(src)
    assert data.datasets == [] and data.chunk_count == 0
    save_imatrix(data, tmp_path / "b.gguf")
    assert (tmp_path / "b.gguf").read_bytes() == src.read_bytes()

    data.extra_kv["general.alignment"] = struct.pack("<II", GGUFValueType.UINT32, 64)
    data.extra_kv["general.name"] = struct.pack("<I", GGUFValueType.STRING) + _gstr("x")
    save_imatrix(data, tmp_path / "c.gguf")
    again = load_imatrix(tmp_path / "c.gguf")
    assert again.extra_kv == data.extra_kv
    assert llama_gguf.accepts(tmp_path / "c.gguf") == 2 * len(stats)
    reader = GGUFReader(tmp_path / "c.gguf")
    assert reader.alignment == 64 and all(t.data_offset % 64 == 0 for t in reader.tensors)


def test_gguf_other_tensors_are_ignored(tmp_path: Path) -> None:
    w = GGUFWriter(tmp_path / "a.gguf", arch="unused")
    w.kv_data[0].pop("general.architecture")
    w.add_type("imatrix")
    w.add_tensor("x.in_sum2", np.ones(4, dtype=np.float32))
    w.add_tensor("x.counts", np.ones(1, dtype=np.float32))
    w.add_tensor("something.else", np.ones(4, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    data = load_imatrix(tmp_path / "a.gguf")
    assert list(data.entries) == ["x"] and data.chunk_count is None and data.chunk_size is None


def test_save_is_atomic_and_leaves_nothing_behind(tmp_path: Path, legacy_file: Path) -> None:
    dest = tmp_path / "keep.gguf"
    dest.write_bytes(b"old")
    bad = ImatrixData("gguf", {"blk.0." + "x" * 60 + ".weight": GgufEntry.from_stats(np.ones(4), np.ones(1))})
    with pytest.raises(ImatrixError, match="63-byte limit"):
        save_imatrix(bad, dest)
    mixed = load_imatrix(legacy_file)
    mixed.entries["zzz"] = GgufEntry.from_stats(np.ones(4), np.ones(1))  # fails after data was written
    with pytest.raises(ImatrixError, match="'zzz' is not a legacy"):
        save_imatrix(mixed, dest)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imatrix.dat", "keep.gguf"]
    with pytest.raises(ImatrixError, match="cannot write"):
        save_imatrix(load_imatrix(legacy_file), tmp_path / "missing-dir" / "x.dat")


def test_saved_file_gets_normal_permissions(tmp_path: Path, legacy_file: Path) -> None:
    old = os.umask(0o022)
    try:
        save_imatrix(load_imatrix(legacy_file), tmp_path / "out.dat")
    finally:
        os.umask(old)
    assert (tmp_path / "out.dat").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- broken input


def _valid_prefix_lengths(path: Path) -> set[int]:
    """Legacy files may legally end right after the entries or after the chunk count."""
    raw = path.read_bytes()
    if raw[:4] == b"GGUF":
        return {len(raw)}
    end_of_entries = len(raw) - 8 - len(DATASET.encode())  # trailer: chunk count, length, dataset
    return {end_of_entries, end_of_entries + 4, len(raw)}


@pytest.mark.parametrize("fmt", ["dat", "gguf"])
def test_every_truncation_is_an_imatrix_error(fmt: str, tmp_path: Path) -> None:
    src = tmp_path / f"small.{fmt}"
    small = make_stats(n_layer=1)
    if fmt == "dat":
        write_legacy_like_imatrix_cpp(src, small, last_chunk=7, dataset=DATASET)
    else:
        write_gguf_like_imatrix_cpp(src, small, datasets=[DATASET], last_chunk=7)
    raw = src.read_bytes()
    valid = _valid_prefix_lengths(src)
    cut = tmp_path / "cut"
    for n in range(len(raw)):
        cut.write_bytes(raw[:n])
        if n in valid:
            load_imatrix(cut)
            continue
        with pytest.raises(ImatrixError) as info:
            load_imatrix(cut)
        assert str(cut) in str(info.value) and "\n" not in str(info.value)


def _gguf_header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<Iqq", version, n_tensors, n_kv)


CORRUPT: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "not an imatrix"),
    "legacy zero entries": (struct.pack("<i", 0), "entry count 0"),
    "legacy huge entry count": (struct.pack("<ii", 2**31 - 1, 3), "entries needs"),
    "legacy negative name": (struct.pack("<ii", 1, -5) + bytes(20), "name length -5"),
    "legacy huge name": (struct.pack("<ii", 1, 2**31 - 1) + bytes(20), "name of entry 0"),
    "legacy huge nval": (
        struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 2**31 - 1) + bytes(8), "values of 'a'"
    ),
    "legacy zero nval": (struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 0) + bytes(8), "has 0 values"),
    "legacy bad utf8": (struct.pack("<ii", 1, 1) + b"\xff" + struct.pack("<ii", 1, 1) + bytes(4), "UTF-8"),
    "legacy duplicate": (
        struct.pack("<i", 2) + 2 * (struct.pack("<i", 1) + b"a" + struct.pack("<ii", 1, 1) + bytes(4)),
        "appears twice",
    ),
    "legacy stray bytes": (struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 1) + bytes(4) + b"xy", "stray"),
    "legacy dataset too long": (
        struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 1) + bytes(4) + struct.pack("<ii", 1, 99) + b"ab",
        "dataset name length 99",
    ),
    "gguf version 1": (_gguf_header(0, 0, version=1), "version 1"),
    "gguf big endian": (b"GGUF" + struct.pack(">I", 3) + bytes(16), "big-endian"),
    "gguf huge kv count": (_gguf_header(0, 2**62), "header needs"),
    "gguf negative tensors": (_gguf_header(-1, 0), "corrupt header"),
    "gguf huge key": (_gguf_header(0, 1) + struct.pack("<Q", 2**63) + bytes(16), "key 0"),
    "gguf huge array": (
        _gguf_header(0, 1) + _gstr("k") + struct.pack("<IIQ", 9, 4, 2**61) + bytes(16),
        "array 'k'",
    ),
    "gguf huge string array": (
        _gguf_header(0, 1) + _gstr("imatrix.datasets") + struct.pack("<IIQ", 9, 8, 2**60) + bytes(16),
        "imatrix.datasets",
    ),
    "gguf bad value type": (
        _gguf_header(0, 1) + _gstr("k") + struct.pack("<I", 99) + bytes(16), "invalid GGUF type 99"
    ),
    "gguf chunk_count as int32": (
        _gguf_header(0, 1) + _gstr("imatrix.chunk_count") + struct.pack("<Ii", 5, 3) + bytes(16),
        "must be UINT32",
    ),
    "gguf model file": (_gguf_header(0, 1) + _gstr("general.type") + struct.pack("<I", 8) + _gstr("model"), "'model'"),
    "gguf no tensors": (_gguf_header(0, 0), "no imatrix entries"),
    "gguf bad alignment": (
        _gguf_header(0, 1) + _gstr("general.alignment") + struct.pack("<II", 4, 24) + bytes(16),
        "not a power of 2",
    ),
    "gguf 5 dims": (_gguf_header(1, 0) + _gstr("a.in_sum2") + struct.pack("<I", 5) + bytes(60), "5 dimensions"),
    "gguf long tensor name": (_gguf_header(1, 0) + _gstr("n" * 64) + bytes(40), "limit 63"),
    "gguf huge tensor": (
        _gguf_header(1, 0) + _gstr("a.in_sum2") + struct.pack("<IqiQ", 1, 2**40, 0, 0) + bytes(64),
        "tensor data",
    ),
    "gguf wrong offset": (
        _gguf_header(1, 0) + _gstr("a.in_sum2") + struct.pack("<IqiQ", 1, 4, 0, 32) + bytes(96),
        "expected 0",
    ),
    "gguf unknown ggml type": (
        _gguf_header(1, 0) + _gstr("a.in_sum2") + struct.pack("<IqiQ", 1, 4, 1234, 0) + bytes(96),
        "unknown ggml type",
    ),
    "gguf f16 sums": (
        _gguf_header(1, 0) + _gstr("a.in_sum2") + struct.pack("<IqiQ", 1, 4, 1, 0) + bytes(96),
        "must be F32",
    ),
    "gguf sums without counts": (
        _gguf_header(1, 0) + _gstr("a.in_sum2") + struct.pack("<IqiQ", 1, 4, 0, 0) + bytes(96),
        "only in_sum2",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_files_give_one_line_imatrix_errors(name: str, tmp_path: Path) -> None:
    raw, message = CORRUPT[name]
    p = tmp_path / "bad.imatrix"
    p.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(ImatrixError, match=message) as info:
            load_imatrix(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated for a {len(raw)}-byte file"
    assert isinstance(info.value, UpscaleError) and str(p) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match="cannot read"):
        load_imatrix(tmp_path / "nope.dat")
    with pytest.raises(ImatrixError, match="cannot read"):
        load_imatrix(tmp_path)


def test_model_gguf_is_not_an_imatrix(tiny_llama: Path) -> None:
    with pytest.raises(ImatrixError, match="not an imatrix|no imatrix entries"):
        load_imatrix(tiny_llama)


@pytest.mark.parametrize("which", ["legacy_file", "gguf_file"])
def test_random_corruption_never_escapes_as_another_exception(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    raw = bytearray(request.getfixturevalue(which).read_bytes())
    rng = np.random.default_rng(1)
    p = tmp_path / "fuzz"
    for _ in range(300):
        buf = bytearray(raw)
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 4))):
            buf[pos] = int(rng.integers(0, 256))
        p.write_bytes(bytes(buf))
        try:
            load_imatrix(p)
        except ImatrixError:
            pass


# --------------------------------------------------------------------------- remapping


@pytest.mark.parametrize("which", ["legacy_file", "gguf_file"])
def test_remap_duplicates_and_renumbers_layers(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src = load_imatrix(request.getfixturevalue(which))
    sources = [("m", 0), ("m", 1), ("m", 2), ("m", 1), ("m", 2), ("m", 3)]  # --slices 0:3,1:4
    out = remap_imatrix({"m": src}, sources)
    assert out.format == src.format
    assert out.block_layers() == list(range(6))
    assert list(out.entries) == sorted(out.entries)  # llama.cpp's order
    assert len(out.entries) == 6 * 3 + 1
    for i, (_, j) in enumerate(sources):
        for kind in ("attn_q", "ffn_down", "ffn_down_exps"):
            a, b = out.entries[f"blk.{i}.{kind}.weight"], src.entries[f"blk.{j}.{kind}.weight"]
            assert type(a) is type(b)
            if isinstance(a, LegacyEntry):
                assert a.ncall == b.ncall and np.array_equal(a.values, b.values)
            else:
                assert a.in_sum2.shape == b.in_sum2.shape and a.counts.shape == b.counts.shape
                assert np.array_equal(a.in_sum2, b.in_sum2) and np.array_equal(a.counts, b.counts)
    assert out.entries["output.weight"] == src.entries["output.weight"]
    assert (out.datasets, out.chunk_count, out.chunk_size) == (src.datasets, src.chunk_count, src.chunk_size)

    saved = tmp_path / ("out" + (".gguf" if out.format == "gguf" else ".dat"))
    save_imatrix(out, saved)
    again = load_imatrix(saved)
    assert list(again.entries) == list(out.entries)
    q_out, q_src = quantize_entries(again), quantize_entries(src)
    assert np.array_equal(q_out["blk.3.ffn_down_exps.weight"], q_src["blk.1.ffn_down_exps.weight"])


def test_remapped_gguf_is_accepted_by_llama_cpp(gguf_file: Path, tmp_path: Path, llama_gguf: LlamaGguf) -> None:
    out = remap_imatrix({"m": load_imatrix(gguf_file)}, [("m", j) for j in (0, 1, 1, 2, 2, 3)])
    save_imatrix(out, tmp_path / "up.gguf")
    assert llama_gguf.accepts(tmp_path / "up.gguf") == 2 * len(out.entries)


def _with_non_block(data: ImatrixData, names: dict[str, float]) -> ImatrixData:
    for name, v in names.items():
        data.entries[name] = GgufEntry.from_stats(np.full(8, v), np.ones(1))
    return data


def test_remap_multi_model_takes_each_models_own_layers(tmp_path: Path) -> None:
    paths = {}
    for m, seed in (("a", 1), ("b", 2)):
        paths[m] = tmp_path / f"{m}.gguf"
        write_gguf_like_imatrix_cpp(paths[m], make_stats(seed=seed, output=False), datasets=[f"{m}.txt", "common"],
                                    last_chunk=5 if m == "a" else 9)
    per = {
        "a": _with_non_block(load_imatrix(paths["a"]), {"token_embd.weight": 1, "output.weight": 2}),
        "b": _with_non_block(load_imatrix(paths["b"]), {"token_embd.weight": 3, "output.weight": 4}),
    }
    sources = [("a", 0), ("a", 1), ("b", 1), ("b", 2)]
    out = remap_imatrix(per, sources)
    for i, (m, j) in enumerate(sources):
        assert out.entries[f"blk.{i}.attn_q.weight"] == per[m].entries[f"blk.{j}.attn_q.weight"]
    # mergekit's rule by default: embeddings from the first slice's model, the rest from the last
    assert out.entries["token_embd.weight"].in_sum2[0] == 1 and out.entries["output.weight"].in_sum2[0] == 4
    assert out.datasets == ["a.txt", "common", "b.txt"] and out.chunk_count == 5

    swapped = remap_imatrix(per, sources, non_block_model={"token_embd": "b", "output.weight": "a"})
    assert swapped.entries["token_embd.weight"].in_sum2[0] == 3 and swapped.entries["output.weight"].in_sum2[0] == 2

    del per["a"].entries["output.weight"]  # a model without the entry contributes nothing
    assert "output.weight" not in remap_imatrix(per, sources, non_block_model={"output": "a"}).entries


def test_remap_errors_name_the_problem(legacy_file: Path, gguf_file: Path) -> None:
    dat, gg = load_imatrix(legacy_file), load_imatrix(gguf_file)
    with pytest.raises(ImatrixError, match="model 'other'"):
        remap_imatrix({"m": gg}, [("m", 0), ("other", 1)])
    with pytest.raises(ImatrixError, match="model 'ghost'"):
        remap_imatrix({"m": gg}, [("m", 0)], non_block_model={"output": "ghost"})
    with pytest.raises(ImatrixError, match="no entries for layer 9 .*layers 0-3"):
        remap_imatrix({"m": gg}, [("m", 0), ("m", 9)])
    with pytest.raises(ImatrixError, match="a: dat, b: gguf"):
        remap_imatrix({"a": dat, "b": gg}, [("a", 0), ("b", 1)])
    with pytest.raises(ImatrixError, match="zero layers"):
        remap_imatrix({"m": gg}, [])


def test_remap_chunk_metadata_is_the_minimum_or_unknown(gguf_file: Path) -> None:
    a, b = load_imatrix(gguf_file), load_imatrix(gguf_file)
    b.chunk_count, b.chunk_size = 3, 256
    out = remap_imatrix({"a": a, "b": b}, [("a", 0), ("b", 1)])
    assert (out.chunk_count, out.chunk_size) == (3, 256)
    b.chunk_count = None
    assert remap_imatrix({"a": a, "b": b}, [("a", 0), ("b", 1)]).chunk_count is None


# --------------------------------------------------------------------------- what llama-quantize computes


def test_quantize_entries_legacy_by_hand() -> None:
    data = ImatrixData(
        "dat",
        {
            "two": LegacyEntry(2, np.array([2, 4, 6], dtype=np.float32)),
            "three": LegacyEntry(3, np.array([1, 2], dtype=np.float32)),
            "zero": LegacyEntry(0, np.array([5, 7], dtype=np.float32)),  # ncall <= 0: values as stored
            "negative": LegacyEntry(-1, np.array([5], dtype=np.float32)),
        },
    )
    q = quantize_entries(data)
    assert q["two"].tolist() == [1, 2, 3]
    assert q["three"].tolist() == [np.float32(1) / np.float32(3), np.float32(2) / np.float32(3)]
    assert q["zero"].tolist() == [5, 7] and q["negative"].tolist() == [5]
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in q.values())


def test_quantize_entries_gguf_by_hand() -> None:
    data = ImatrixData(
        "gguf",
        {
            "exps": GgufEntry(
                np.array([[2, 4], [3, 9], [5, 10], [8, 8]], dtype=np.float32),
                np.array([[2], [0], [2.5], [0.4]], dtype=np.float32),  # lround: 2, 0, 3, 0
            ),
            "dense": GgufEntry(np.array([6, 9, 12], dtype=np.float32), np.array([3], dtype=np.float32)),
        },
        chunk_count=1,
        chunk_size=512,
    )
    q = quantize_entries(data)
    third = lambda x: np.float32(x) / np.float32(3)  # noqa: E731
    assert q["exps"].tolist() == [1, 2, 1, 1, third(5), third(10), 1, 1]
    assert q["dense"].tolist() == [2, 3, 4]


def test_quantize_entries_match_the_raw_statistics(legacy_file: Path, gguf_file: Path, stats: Stats) -> None:
    """Both formats give llama-quantize sums/count per matrix (1 for unused experts)."""
    for path, rtol in ((gguf_file, 0), (legacy_file, 1e-6)):
        q = quantize_entries(load_imatrix(path))
        for name, (values, counts) in stats.items():
            per = values.size // len(counts)
            want = np.concatenate([
                values[k * per:(k + 1) * per] / np.float32(c) if c else np.ones(per, dtype=np.float32)
                for k, c in enumerate(counts)
            ])
            np.testing.assert_allclose(q[name], want, rtol=rtol, atol=0)


def test_llama_quantize_refusals_are_mirrored(gguf_file: Path) -> None:
    data = load_imatrix(gguf_file)
    data.chunk_size = None
    with pytest.raises(ImatrixError, match="imatrix.chunk_size"):
        quantize_entries(data)
    with pytest.raises(ImatrixError, match="imatrix.chunk_size"):
        imatrix_metadata(data, "x.gguf")
    data = ImatrixData("dat", {"x": LegacyEntry(1, np.array([np.inf], dtype=np.float32))})
    with pytest.raises(ImatrixError, match="'x' has non-finite"):
        quantize_entries(data)


def test_imatrix_metadata_keys_and_types(legacy_file: Path, gguf_file: Path) -> None:
    meta = imatrix_metadata(load_imatrix(gguf_file), "imat/imatrix.gguf")
    assert meta == {
        "quantize.imatrix.file": (GGUFValueType.STRING, "imat/imatrix.gguf"),
        "quantize.imatrix.dataset": (GGUFValueType.STRING, "wiki.train.raw"),  # datasets[0] only
        "quantize.imatrix.entries_count": (GGUFValueType.UINT32, 13),
        "quantize.imatrix.chunks_count": (GGUFValueType.UINT32, 7),
    }
    data = load_imatrix(legacy_file)
    data.chunk_count, data.datasets = 0, []
    long_path = "d/" + "é" * 80  # 162 bytes: cut to 127 like strncpy, without half a character
    meta = imatrix_metadata(data, long_path)
    assert list(meta) == ["quantize.imatrix.file", "quantize.imatrix.entries_count"]
    assert meta["quantize.imatrix.file"][1] == "d/" + "é" * 62


# --------------------------------------------------------------------------- end to end with llama.cpp


def _llama_quantize(src: Path, dst: Path, imatrix: dict[str, np.ndarray] | None, meta: dict[str, Any]) -> int:
    """llama_model_quantize the way llama-quantize calls it (IQ2_XXS, imatrix + kv overrides)."""
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_IQ2_XXS
    params.nthread = 2
    keep: list[Any] = []
    if imatrix is not None:
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}
        items = (lc.llama_model_imatrix_data * (len(arrays) + 1))()
        for i, (name, arr) in enumerate(arrays.items()):
            items[i].name = name.encode()
            items[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            items[i].size = arr.size
        keep += [arrays, items]
        params.imatrix = items
        kvo = (lc.llama_model_kv_override * (len(meta) + 1))()
        for i, (key, (vtype, value)) in enumerate(meta.items()):
            kvo[i].key = key.encode()
            if vtype == GGUFValueType.STRING:
                kvo[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_STR
                kvo[i].value.val_str = value.encode()
            else:
                kvo[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
                kvo[i].value.val_i64 = value
        keep.append(kvo)
        params.kv_overrides = kvo
    return int(lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)))


def _model_imatrix(n_layer: int, seed: int = 0) -> ImatrixData:
    """A GGUF imatrix for modelfactory's llama (n_embd 256, n_ff 512)."""
    rng = np.random.default_rng(seed)
    entries: dict[str, Any] = {}
    for i in range(n_layer):
        for kind, n in (("attn_q", 256), ("attn_k", 256), ("attn_v", 256), ("attn_output", 256),
                        ("ffn_gate", 256), ("ffn_up", 256), ("ffn_down", 512)):
            entries[f"blk.{i}.{kind}.weight"] = GgufEntry.from_stats(rng.uniform(1, 100, n) * 1000, [1000.0])
    entries["output.weight"] = GgufEntry.from_stats(rng.uniform(1, 100, 256), [1.0])
    return ImatrixData("gguf", dict(sorted(entries.items())), ["calib.txt"], 2, 512)


def test_end_to_end_llama_quantize_uses_the_remapped_imatrix(tmp_path: Path, tiny_llama: Path) -> None:
    lc = pytest.importorskip("llama_cpp")
    from modelfactory import make_model

    sources = [("m", j) for j in (0, 1, 2, 1, 2, 3)]
    upscaled = make_model(tmp_path / "up6.gguf", n_layer=6, seed=3)  # stands in for the upscaled model
    src_imatrix = _model_imatrix(4)
    save_imatrix(remap_imatrix({"m": src_imatrix}, sources), tmp_path / "up6.imatrix.gguf")
    remapped = load_imatrix(tmp_path / "up6.imatrix.gguf")

    # without renamed copies llama.cpp refuses: blk.4/blk.5 have no importance matrix
    assert _llama_quantize(upscaled, tmp_path / "bad.gguf", quantize_entries(src_imatrix), {}) != 0

    out = tmp_path / "up6-IQ2_XXS.gguf"
    meta = imatrix_metadata(remapped, "up6.imatrix.gguf")
    assert _llama_quantize(upscaled, out, quantize_entries(remapped), meta) == 0
    reader = GGUFReader(out)
    for key, (vtype, value) in meta.items():
        field = reader.fields[key]
        assert field.types == [vtype]
        assert (field.contents() if vtype == GGUFValueType.STRING else int(field.parts[-1][0])) == value

    # the bytes of an IQ2_XXS tensor equal ggml_quantize_chunk with the source layer's imatrix row
    lib = ctypes.CDLL(str(Path(lc.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    src_reader = GGUFReader(upscaled)
    want_imatrix = quantize_entries(src_imatrix)
    checked = 0
    for i, (_, j) in enumerate(sources):
        name = f"blk.{i}.attn_q.weight"
        t_out = next(t for t in reader.tensors if t.name == name)
        if t_out.tensor_type != GGMLQuantizationType.IQ2_XXS:
            continue
        w = np.ascontiguousarray(next(t for t in src_reader.tensors if t.name == name).data, dtype=np.float32)
        dst = np.zeros(t_out.n_bytes, dtype=np.uint8)
        imx = want_imatrix[f"blk.{j}.attn_q.weight"]
        n = lib.ggml_quantize_chunk(int(GGMLQuantizationType.IQ2_XXS), w.ctypes.data, dst.ctypes.data, 0,
                                    w.shape[0], w.shape[1], imx.ctypes.data)
        assert n == t_out.n_bytes
        assert dst.tobytes() == np.asarray(t_out.data).tobytes(), name
        checked += 1
    assert checked >= 4


# --------------------------------------------------------------------------- whole files, through the CLI


def _full_stats(n_layer: int, seed: int = 0) -> Stats:
    """Statistics for every matrix of modelfactory's llama (n_embd 256, n_ff 512), as imatrix.cpp collects."""
    rng = np.random.default_rng(seed)
    stats: Stats = {}
    for i in range(n_layer):
        for kind, n in (("attn_q", 256), ("attn_k", 256), ("attn_v", 256), ("attn_output", 256),
                        ("ffn_gate", 256), ("ffn_up", 256), ("ffn_down", 512)):
            stats[f"blk.{i}.{kind}.weight"] = (rng.uniform(1, 50, n).astype(np.float32), [CHUNK_SIZE * (3 + i)])
    stats["output.weight"] = (rng.uniform(1, 50, 256).astype(np.float32), [CHUNK_SIZE * 3])
    return stats


def _write_matrix(path: Path, fmt: str, stats: Stats) -> Path:
    if fmt == "dat":
        write_legacy_like_imatrix_cpp(path, stats, last_chunk=6, dataset=DATASET)
    else:
        write_gguf_like_imatrix_cpp(path, stats, datasets=[DATASET, "other.txt"], last_chunk=6)
    return path


@pytest.mark.parametrize("fmt", ["dat", "gguf"])
@pytest.mark.parametrize("type_name", ["IQ2_XXS", "Q4_K_M"])
def test_quantize_with_imatrix_is_llama_quantize_whole_file(fmt: str, type_name: str, tiny_llama: Path,
                                                            tmp_path: Path) -> None:
    """`quantize --imatrix FILE` writes the very file llama-quantize writes given FILE: metadata keys,
    their order and values (quantize.imatrix.*), tensor types and bytes."""
    from llama_reference import llama_quantize, read_imatrix

    from helpers import cli
    im = _write_matrix(tmp_path / f"m.{fmt}", fmt, _full_stats(4))
    ours = tmp_path / "ours.gguf"
    cli("quantize", tiny_llama, "-o", ours, "--type", type_name, "--imatrix", im, check=True)
    ref = llama_quantize(tiny_llama, tmp_path / "ref.gguf", type_name, imatrix=read_imatrix(im), imatrix_file=str(im))
    assert list(GGUFReader(ours).fields) == list(GGUFReader(ref).fields)
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("fmt", ["dat", "gguf"])
def test_run_with_named_imatrix_is_the_two_step_path(fmt: str, tiny_llama: Path, tmp_path: Path) -> None:
    """`run --imatrix NAME=FILE` (the recipe's model name) equals upscale + llama-quantize given the
    source matrix with each output layer's entries copied from its source layer (renamed here,
    independently of gguf-upscale imatrix), recording the source matrix as given."""
    from llama_reference import Imatrix, llama_quantize, read_imatrix

    from helpers import cli
    im = _write_matrix(tmp_path / f"src.{fmt}", fmt, _full_stats(4, seed=5))
    cfg = tmp_path / "r.yaml"
    cfg.write_text("merge_method: passthrough\nslices:\n"
                   "  - sources: [{model: base, layer_range: [0, 3]}]\n"
                   "  - sources: [{model: base, layer_range: [1, 4]}]\n")
    recipe = ["--config", cfg, "--model", f"base={tiny_llama}"]
    one = tmp_path / "one.gguf"
    cli("run", *recipe, "-o", one, "--type", "IQ2_XXS", "--imatrix", f"base={im}", "--no-smoke", check=True)
    up = tmp_path / "up.gguf"
    cli("upscale", *recipe, "-o", up, check=True)
    src = read_imatrix(im)
    layer_map = [0, 1, 2, 1, 2, 3]
    values = {n: v for n, v in src.values.items() if not n.startswith("blk.")}
    for i, j in enumerate(layer_map):
        values.update({n.replace(f"blk.{j}.", f"blk.{i}.", 1): v for n, v in src.values.items()
                       if n.startswith(f"blk.{j}.")})
    ref = llama_quantize(up, tmp_path / "two.gguf", "IQ2_XXS",
                         imatrix=Imatrix(values, src.datasets, src.chunk_count), imatrix_file=str(im),
                         entries_count=len(src.values))
    assert list(GGUFReader(one).fields) == list(GGUFReader(ref).fields)
    assert one.read_bytes() == ref.read_bytes()
