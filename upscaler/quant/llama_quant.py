"""llama.cpp's quantizer through llama-cpp-python: whole files, and its per-tensor type decisions.

`quantize_file` is `llama-quantize` as a function. `target_types` answers "which ggml type would
llama.cpp give each tensor of this model?" for a model that may not exist yet, by letting
llama.cpp decide: it writes a skeleton GGUF (real metadata and tensor infos, tensor data a
sparse hole that costs no disk) and runs llama_model_quantize with dry_run, reading the
per-tensor log lines. That keeps every rule of llama_tensor_get_type (positional use_more_bits
counters, the "70B" attn_v bump, shape fallbacks, tied embeddings, has_imatrix) exact, for every
architecture, without porting it. The C++ helpers in llama-ext.h were rejected: they reset
has_imatrix to false and infer the 70B type for LLM_ARCH_LLAMA only, while the real loader also
does it for qwen2/olmo/deci (80 layers) and jais2 (68 layers).
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, Keys

from ..errors import QuantizeError
from ..format.gguf_header import pack_header, padded, tensor_nbytes
from ..format.source import KV
from ..planning.llama_limits import load_problem
from . import ggml, llama_log
from .quant_types import QuantType, parse_quant_type

_BLK_RE = re.compile(r"^blk\.\s*([+-]?\d+)")
# "[  12/ 291]  blk.1.attn_v.weight - [  256,   128,     1,     1], type =    f16, ..."
_TENSOR_RE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+- \[([\d,\s]+)\], type =\s*(\S+),", re.M)
# what follows the header: "converting to q4_K .. size = ..." (possibly after a "did not find
# weights" line), or directly "size = 0.25 MiB -> 0.07 MiB (q4_K)" (dry run) / "size = 0.001 MiB" (kept)
_CONVERTED_RE = re.compile(r"^\s*converting to (\S+) \.\.", re.M)
_SIZE_RE = re.compile(r"\s*size =\s*\S+ MiB(?: ->\s*\S+ MiB \((\S+)\))?[ \t]*$", re.M)


class TensorInfo(Protocol):
    """What target_types needs to know of a tensor (source.SourceTensor fits)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...  # GGUF order: ne0 first
    @property
    def ggml_type(self) -> int: ...


@dataclass(frozen=True)
class Mixture:
    """llama-quantize's flags that change per-tensor types (besides the type and --imatrix)."""

    pure: bool = False  # --pure: every quantizable tensor gets the default type
    leave_output_tensor: bool = False  # --leave-output-tensor
    output_tensor_type: int | str | None = None  # --output-tensor-type (ggml type id or name)
    token_embedding_type: int | str | None = None  # --token-embedding-type
    # --tensor-type REGEX=TYPE: first regex_search match wins; lower-cased like quantize.cpp does
    tensor_types: tuple[tuple[str, int | str], ...] = ()


@dataclass(frozen=True)
class TensorLog:
    """One tensor as llama.cpp's quantizer reported it."""

    index: int  # 1-based position in the quantizer's (= output file's) order
    name: str
    shape: tuple[int, ...]  # ne0, ne1, ne2, ne3
    src_type: int
    dst_type: int


@dataclass
class QuantizeReport:
    """llama.cpp's log of one llama_model_quantize call: every line, and the per-tensor records."""

    lines: list[str] = field(default_factory=list)
    tensors: list[TensorLog] = field(default_factory=list)


def llama_tensor_order(names: Iterable[str]) -> list[str]:
    """Sort tensor names as llama_model_loader's weights_map does (weight_name_comparer).

    Non-block tensors first, then by block number, ties by name (bytewise). This order drives
    the quantizer's positional counters and is the tensor order of its output file.
    """
    def key(name: str) -> tuple[int, bytes]:
        m = _BLK_RE.match(name)
        return (int(m.group(1)) if m else -1, name.encode())

    return sorted(names, key=key)


def _parse_tensor_logs(text: str) -> list[TensorLog]:
    """Per-tensor records from the quantizer's log (a tensor whose line has no outcome is left out)."""
    names = ggml.type_by_name()
    headers = list(_TENSOR_RE.finditer(text))
    out: list[TensorLog] = []
    for i, m in enumerate(headers):
        segment = text[m.end(): headers[i + 1].start() if i + 1 < len(headers) else len(text)]
        src = m.group(5)
        converted, sized = _CONVERTED_RE.search(segment), _SIZE_RE.match(segment)
        if converted:
            dst = converted.group(1)
        elif sized:
            dst = sized.group(1) or src
        else:
            continue
        if src not in names or dst not in names:
            raise QuantizeError(f"llama.cpp reported an unknown tensor type for {m.group(3)}: {src} -> {dst}")
        shape = tuple(int(d) for d in m.group(4).split(","))
        out.append(TensorLog(int(m.group(1)), m.group(3), shape, names[src], names[dst]))
    return out


def _failure_reason(lines: list[str]) -> str:
    """llama.cpp's own one-line reason, plus the offending tensor when it named one."""
    reason = "llama_model_quantize failed (no reason logged)"
    for line in lines:
        if "failed to quantize:" in line:
            reason = line.split("failed to quantize:", 1)[1].strip()
    details = [line.strip().lstrip("- ").strip() for line in lines
               if line.strip().startswith(("- offending tensor:", "- target type:"))]
    if details:
        reason += f" ({', '.join(details)})"
    return reason


# --------------------------------------------------------------------------- quantize


@cache
def _backend_init() -> None:
    import llama_cpp

    llama_cpp.llama_backend_init()


def _ggml_type_arg(t: int | str | None) -> int:
    """ggml type (id or name like "q8_0") -> id; None -> GGML_TYPE_COUNT ("not set")."""
    if t is None:
        return ggml.GGML_TYPE_COUNT
    if isinstance(t, str):
        by_name = {k.lower(): v for k, v in ggml.type_by_name().items()}
        if t.lower() not in by_name:
            raise QuantizeError(f"unknown ggml type {t!r}; valid: {', '.join(ggml.type_by_name())}")
        return by_name[t.lower()]
    ggml.type_name(t)  # validates
    return int(t)


class _Params:
    """A llama_model_quantize_params plus every C array it points to, kept alive together."""

    def __init__(self, qtype: QuantType, *, n_threads: int, imatrix: Mapping[str, np.ndarray] | None,
                 allow_requantize: bool, mixture: Mixture, kv_overrides: Mapping[str, bool | int | float | str],
                 dry_run: bool, keep_split: bool = False) -> None:
        import llama_cpp as ll

        p = ll.llama_model_quantize_default_params()
        p.nthread = n_threads
        p.ftype = qtype.ftype
        p.only_copy = qtype.only_copy
        p.allow_requantize = allow_requantize
        p.quantize_output_tensor = not mixture.leave_output_tensor
        p.pure = mixture.pure
        p.output_tensor_type = _ggml_type_arg(mixture.output_tensor_type)
        p.token_embedding_type = _ggml_type_arg(mixture.token_embedding_type)
        p.dry_run = dry_run
        p.keep_split = keep_split
        self._keep: list[object] = []

        if imatrix is not None:
            arr = (ll.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed terminator
            for i, (name, values) in enumerate(imatrix.items()):
                v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
                raw_name = name.encode()
                self._keep += [v, raw_name]
                arr[i].name = raw_name
                arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                arr[i].size = v.size
            self._keep.append(arr)
            p.imatrix = arr

        if kv_overrides:
            kvs = (ll.llama_model_kv_override * (len(kv_overrides) + 1))()  # key[0] == 0 terminates
            for i, (key, value) in enumerate(kv_overrides.items()):
                _set_kv_override(kvs[i], key, value)
            self._keep.append(kvs)
            p.kv_overrides = kvs

        if mixture.tensor_types:
            tts = (ll.llama_model_tensor_override * (len(mixture.tensor_types) + 1))()
            for i, (pattern, t) in enumerate(mixture.tensor_types):
                pat = pattern.lower().encode()
                self._keep.append(pat)
                tts[i].pattern = pat
                tts[i].type = _ggml_type_arg(t)
            tts[len(mixture.tensor_types)].type = ggml.GGML_TYPE_COUNT
            self._keep.append(tts)
            p.tt_overrides = tts
        self.params = p


def _set_kv_override(o: object, key: str, value: bool | int | float | str) -> None:
    import llama_cpp as ll

    raw_key = key.encode()
    if not 0 < len(raw_key) < 128:
        raise QuantizeError(f"metadata override key {key!r} must be 1-127 bytes")
    o.key = raw_key  # type: ignore[attr-defined]
    if isinstance(value, bool):
        o.tag, o.value.val_bool = ll.LLAMA_KV_OVERRIDE_TYPE_BOOL, value  # type: ignore[attr-defined]
    elif isinstance(value, int):
        o.tag, o.value.val_i64 = ll.LLAMA_KV_OVERRIDE_TYPE_INT, value  # type: ignore[attr-defined]
    elif isinstance(value, float):
        o.tag, o.value.val_f64 = ll.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value  # type: ignore[attr-defined]
    elif isinstance(value, str) and len(value.encode()) < 128:
        o.tag, o.value.val_str = ll.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()  # type: ignore[attr-defined]
    else:
        raise QuantizeError(f"metadata override {key!r}: value must be bool, int, float or a string "
                            f"under 128 bytes, got {value!r}")


def quantize_file(inp: str | os.PathLike[str], out: str | os.PathLike[str] | None, ftype: str | int | QuantType, *,
                  n_threads: int = 0, imatrix: Mapping[str, np.ndarray] | None = None,
                  allow_requantize: bool = False, mixture: Mixture | None = None,
                  kv_overrides: Mapping[str, bool | int | float | str] | None = None,
                  dry_run: bool = False, keep_split: bool = False) -> QuantizeReport:
    """Run llama_model_quantize (llama-quantize as a function); failures become one-line QuantizeErrors.

    `imatrix` maps tensor names to per-column importances (n_per_row floats, times n_expert for
    3-D tensors); giving one, even empty, also switches the imatrix-aware mixture rules on.
    llama.cpp's log goes through `llama_log` (live on the `upscaler.llama` logger when verbose);
    the report keeps every line. `n_threads` <= 0 means all cores. OUT appears only when
    llama.cpp succeeded (it is written under a temporary name first). `out` is ignored (may be
    None) for a dry run.
    """
    qtype = parse_quant_type(ftype)
    inp = Path(inp)
    if not inp.is_file():
        raise QuantizeError(f"{inp}: no such file")
    params = _Params(qtype, n_threads=n_threads, imatrix=imatrix, allow_requantize=allow_requantize,
                     mixture=mixture or Mixture(), kv_overrides=kv_overrides or {}, dry_run=dry_run,
                     keep_split=keep_split)
    subject = f"{inp.name} to {qtype.name}"
    if dry_run:
        return _run(inp, Path(os.devnull), params, subject)
    if out is None:
        raise QuantizeError("an output path is needed unless dry_run is set")
    out = Path(out)
    if out.exists() and out.samefile(inp):
        raise QuantizeError(f"input and output are the same file: {inp}")
    if not out.parent.is_dir():
        raise QuantizeError(f"{out.parent}: output directory does not exist")
    # llama.cpp writes in place; a failed run must not leave a plausible-looking OUT behind
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        report = _run(inp, partial, params, subject)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return report


def _run(inp: Path, out: Path, params: _Params, subject: str) -> QuantizeReport:
    import llama_cpp as ll

    _backend_init()
    with llama_log.capture() as lines:
        rc = ll.llama_model_quantize(os.fsencode(inp), os.fsencode(out), ctypes.byref(params.params))
    report = QuantizeReport(lines=lines, tensors=_parse_tensor_logs("\n".join(lines)))
    if rc != 0:
        raise QuantizeError(f"llama.cpp could not quantize {subject}: {_failure_reason(lines)}")
    return report


# --------------------------------------------------------------------------- target types


def _write_skeleton(path: Path, tensors: Sequence[TensorInfo], kvs: Iterable[KV]) -> None:
    """A GGUF with the real header and a sparse, all-zero data area (llama.cpp only checks its bounds)."""
    kv_list = [kv for kv in kvs if not kv.key.startswith("split.")]
    alignment = next((int(kv.value) for kv in kv_list if kv.key == Keys.General.ALIGNMENT), GGUF_DEFAULT_ALIGNMENT)
    infos = [(t.name, t.shape, int(t.ggml_type), tensor_nbytes(t.ggml_type, t.shape)) for t in tensors]
    header, _ = pack_header(kv_list, infos, alignment)
    data = sum(padded(n, alignment) for *_, n in infos)
    try:
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(padded(len(header), alignment) + data)
    except OSError as e:  # full temp disk, file size limit: the dry run needs a (sparse) model-sized file
        raise QuantizeError(f"{path.parent}: cannot write the header-only model llama.cpp's dry run reads "
                            f"({e.strerror or e}); set TMPDIR to a folder on another filesystem") from None


def target_types(tensors: Sequence[TensorInfo], kvs: Iterable[KV], ftype: str | int | QuantType, *,
                 imatrix: bool = False, mixture: Mixture | None = None,
                 kv_overrides: Mapping[str, bool | int | float | str] | None = None, keep_split: bool = False,
                 tmp_dir: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """The ggml type llama.cpp's quantizer gives each tensor, decided by llama.cpp itself (dry run).

    `tensors` and `kvs` describe the model (metadata exactly as it will be written: block_count,
    head counts, expert count ...); nothing but its header is written (to `tmp_dir`). Returns
    name -> ggml type id in llama_tensor_order. `imatrix` says whether the real run will have
    one (it changes some choices, e.g. IQ4_XS ffn_down of the first layers). `kv_overrides`
    (--override-kv) reach llama.cpp's loader as they do in llama-quantize, so they can change
    hyperparameters the rules read. `keep_split` (--keep-split) makes llama.cpp keep the order of
    `tensors` (file order, shard by shard), which drives its positional counters.
    """
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise QuantizeError("duplicate tensor names in the model")
    qtype = parse_quant_type(ftype)
    kvs = list(kvs)
    values = {kv.key: kv.value for kv in kvs}
    arch = values.get("general.architecture")
    problem = load_problem(values, arch) if isinstance(arch, str) else None  # no arch: llama.cpp raises
    if problem:  # llama.cpp would abort the process, not raise
        raise QuantizeError(f"llama.cpp cannot load this model: {problem}")
    # an empty imatrix array is enough to switch llama.cpp's has_imatrix rules on
    params = _Params(qtype, n_threads=1, imatrix={} if imatrix else None, allow_requantize=True,
                     mixture=mixture or Mixture(), kv_overrides=kv_overrides or {}, dry_run=True,
                     keep_split=keep_split)
    with tempfile.TemporaryDirectory(prefix="gguf-upscale-", dir=tmp_dir) as d:
        skeleton = Path(d) / "skeleton.gguf"
        _write_skeleton(skeleton, tensors, kvs)
        report = _run(skeleton, Path(os.devnull), params, f"this model to {qtype.name}")
    types = {t.name: t.dst_type for t in report.tensors}
    missing = [n for n in names if n not in types]
    if missing or len(types) != len(names):
        raise QuantizeError(f"llama.cpp's dry run did not report {len(missing)} tensor(s), e.g. "
                            f"{', '.join(missing[:3]) or '?'}")
    return types


# --------------------------------------------------------------------------- llama-quantize's option syntax


def parse_ggml_type(text: str) -> int:
    """A ggml type name as llama-quantize's parse_ggml_type takes it (`q8_0`, `Q4_K`, `f16`), any case."""
    by_name = {k.lower(): v for k, v in ggml.type_by_name().items()}
    t = by_name.get(text.strip().lower())
    if t is None:
        raise QuantizeError(f"invalid ggml type {text!r}; valid: {', '.join(ggml.type_by_name())}")
    return t


def parse_tensor_type(text: str) -> tuple[str, int]:
    """`--tensor-type PATTERN=TYPE` (quantize.cpp parse_tensor_type): the pattern lower-cased,
    searched as a regex in each tensor name; the first matching option wins."""
    pattern, eq, type_text = text.partition("=")
    if not eq:
        raise QuantizeError(f"--tensor-type {text!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0")
    if not pattern:
        raise QuantizeError(f"--tensor-type {text!r}: missing tensor name pattern")
    if not type_text:
        raise QuantizeError(f"--tensor-type {text!r}: missing quantization type")
    try:
        re.compile(pattern.lower())
    except re.error as e:
        raise QuantizeError(f"--tensor-type {text!r}: not a regular expression ({e})") from None
    return pattern.lower(), parse_ggml_type(type_text)


KvValue = bool | int | float | str


def parse_kv_override(text: str) -> tuple[str, KvValue]:
    """`--override-kv KEY=TYPE:VALUE` with TYPE int, float, bool or str (common.cpp
    string_parse_kv_override): the Python type of the value carries llama.cpp's tag."""
    key, eq, rest = text.partition("=")
    if not eq or len(key.encode()) >= 128:
        raise QuantizeError(f"--override-kv {text!r}: expected KEY=TYPE:VALUE (KEY under 128 bytes), "
                            "e.g. general.name=str:My model")
    if not key:
        raise QuantizeError(f"--override-kv {text!r}: empty key")
    if key in ("general.alignment",) or key.startswith("split."):
        raise QuantizeError(f"--override-kv {text!r}: {key} is set by the writer, not overridable")
    kind, colon, value = rest.partition(":")
    try:
        if colon and kind == "int":
            number = int(value, 10)
            if not -2**63 <= number < 2**63:
                raise ValueError
            return key, number
        if colon and kind == "float":
            return key, float(value)
    except ValueError:
        raise QuantizeError(f"--override-kv {text!r}: {value!r} is not a valid {kind}") from None
    if colon and kind == "bool":
        if value not in ("true", "false"):
            raise QuantizeError(f"--override-kv {text!r}: a bool is true or false")
        return key, value == "true"
    if colon and kind == "str":
        if len(value.encode()) > 127:
            raise QuantizeError(f"--override-kv {text!r}: a string value cannot exceed 127 bytes")
        return key, value
    raise QuantizeError(f"--override-kv {text!r}: TYPE must be int, float, bool or str (KEY=TYPE:VALUE)")


def override_kvs(overrides: Mapping[str, KvValue]) -> list[KV]:
    """The metadata llama_model_quantize writes for kv overrides (llama-quant.cpp): a float as
    F32, an int as UINT32 of its absolute value, a bool as BOOL, a string as STRING."""
    from gguf import GGUFValueType as T
    out = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            out.append(KV(key, value, T.BOOL))
        elif isinstance(value, int):
            out.append(KV(key, abs(value) & 0xFFFFFFFF, T.UINT32))
        elif isinstance(value, float):
            out.append(KV(key, float(np.float32(value)), T.FLOAT32))
        else:
            out.append(KV(key, value, T.STRING))
    return out
