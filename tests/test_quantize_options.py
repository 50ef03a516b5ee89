"""llama-quantize's options on `quantize` and `run`: the same bytes llama.cpp's quantizer writes when
called with the same parameters (llama_model_quantize_params), option by option."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from helpers import assert_one_line_error, cli, leftovers, metadata, tensor_bytes, tensor_types
from upscaler.quant.llama_quant import Mixture, _Params, _run, parse_kv_override
from upscaler.quant.quant_types import parse_quant_type


def llama_quantize(src: Path, dst: Path, type_name: str = "Q4_K_M", *, mixture: Mixture | None = None,
                   kv_overrides: dict | None = None, keep_split: bool = False) -> Path:
    """llama.cpp's own driver with these parameters, as llama-quantize sets them from its options.

    `dst` is the path llama-quantize is given; with keep_split, llama.cpp names the shards
    DST-0000i-of-0000N.gguf from DST without `.gguf`, as quantize.cpp strips it."""
    params = _Params(parse_quant_type(type_name), n_threads=1, imatrix=None, allow_requantize=True,
                     mixture=mixture or Mixture(), kv_overrides=kv_overrides or {}, dry_run=False,
                     keep_split=keep_split)
    target = Path(str(dst)[:-5]) if keep_split and str(dst).endswith(".gguf") else dst
    _run(src, target, params, "reference")
    return dst


OPTION_CASES = {
    "output-tensor-type": (["--output-tensor-type", "Q8_0"], dict(mixture=Mixture(output_tensor_type="q8_0"))),
    "token-embedding-type": (["--token-embedding-type", "q5_k"], dict(mixture=Mixture(token_embedding_type="q5_K"))),
    "pure": (["--pure"], dict(mixture=Mixture(pure=True))),
    "leave-output-tensor": (["--leave-output-tensor"], dict(mixture=Mixture(leave_output_tensor=True))),
    "tensor-type": (["--tensor-type", "attn_v=q8_0", "--tensor-type", "BLK\\.[12]\\.ffn_down=q5_0",
                     "--tensor-type", "ffn=q4_0"],
                    dict(mixture=Mixture(tensor_types=(("attn_v", "q8_0"), ("blk\\.[12]\\.ffn_down", "q5_0"),
                                                       ("ffn", "q4_0"))))),
    "override-kv": (["--override-kv", "general.name=str:Renamed model", "--override-kv", "llama.context_length=int:-4096",
                     "--override-kv", "test.ratio=float:0.1", "--override-kv", "test.flag=bool:true",
                     "--override-kv", "general.file_type=int:7"],
                    dict(kv_overrides={"general.name": "Renamed model", "llama.context_length": -4096,
                                       "test.ratio": 0.1, "test.flag": True, "general.file_type": 7})),
    "all-together": (["--pure", "--output-tensor-type", "q6_k", "--token-embedding-type", "q8_0",
                      "--tensor-type", "attn_q=q5_1", "--override-kv", "general.name=str:All"],
                     dict(mixture=Mixture(pure=True, output_tensor_type="q6_K", token_embedding_type="q8_0",
                                          tensor_types=(("attn_q", "q5_1"),)),
                          kv_overrides={"general.name": "All"})),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_quantize_option_equals_llama_quantize(tiny_llama: Path, tmp_path: Path, case: str) -> None:
    args, ref_kw = OPTION_CASES[case]
    ours = tmp_path / "ours.gguf"
    cli("quantize", tiny_llama, "-o", ours, "--type", "Q4_K_M", "--threads", "2", *args, check=True)
    ref = llama_quantize(tiny_llama, tmp_path / "ref.gguf", **ref_kw)
    assert ours.read_bytes() == ref.read_bytes()  # whole file: metadata, order, types, bytes
    # and the option did something: the file differs from plain Q4_K_M
    plain = llama_quantize(tiny_llama, tmp_path / "plain.gguf")
    assert ours.read_bytes() != plain.read_bytes()


def test_override_kv_types_as_llama_cpp_writes_them(tiny_llama: Path, tmp_path: Path) -> None:
    ours = tmp_path / "ours.gguf"
    cli("quantize", tiny_llama, "-o", ours, "--override-kv", "llama.context_length=int:-4096",
        "--override-kv", "test.ratio=float:0.25", "--override-kv", "test.flag=bool:false", check=True)
    fields = GGUFReader(ours).fields
    from gguf import GGUFValueType as T
    assert fields["llama.context_length"].types == [T.UINT32]  # llama.cpp: UINT32 of |value|
    assert fields["test.ratio"].types == [T.FLOAT32]
    assert metadata(ours)["llama.context_length"] == 4096 and metadata(ours)["test.flag"] is False


@pytest.mark.parametrize("case", ["tensor-type", "override-kv", "pure"])
def test_run_option_equals_upscale_then_llama_quantize(tiny_llama: Path, tmp_path: Path, case: str) -> None:
    args, ref_kw = OPTION_CASES[case]
    up = tmp_path / "up.gguf"
    cli("upscale", tiny_llama, "--slices", "0:3,1:4", "-o", up, "--no-model-card", check=True)
    two = llama_quantize(up, tmp_path / "two.gguf", **ref_kw)
    one = tmp_path / "one.gguf"
    cli("run", tiny_llama, "--slices", "0:3,1:4", "-o", one, "--no-smoke", "--no-model-card", *args, check=True)
    assert one.read_bytes() == two.read_bytes()


def test_keep_split_equals_llama_quantize(tiny_llama_split: Path, tmp_path: Path) -> None:
    ours = tmp_path / "ours.gguf"
    proc = cli("quantize", tiny_llama_split, "-o", ours, "--keep-split", check=True)
    shards = sorted(tmp_path.glob("ours-*-of-*.gguf"))
    assert len(shards) == 3, proc.stdout
    llama_quantize(tiny_llama_split, tmp_path / "ref.gguf", keep_split=True)
    refs = sorted(tmp_path.glob("ref-*-of-*.gguf"))
    assert len(refs) == 3
    # the first shard holds all metadata: identical to the byte
    assert shards[0].read_bytes() == refs[0].read_bytes()
    # later shards: the same tensors in the same order and bytes (ours add a padding key for cloning)
    for a, b in zip(shards[1:], refs[1:]):
        ra, rb = GGUFReader(a), GGUFReader(b)
        assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
        assert all(bytes(x.data) == bytes(y.data) and x.tensor_type == y.tensor_type
                   for x, y in zip(ra.tensors, rb.tensors))
    assert tensor_bytes(shards[0]) == tensor_bytes(refs[0])  # the whole set, loaded from its first shard


def test_option_errors_are_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    for args, frag in ((["--tensor-type", "attn_v"], "PATTERN=TYPE"),
                       (["--tensor-type", "attn_v=q9_9"], "q9_9"),
                       (["--output-tensor-type", "nope"], "--output-tensor-type"),
                       (["--override-kv", "general.name=string:x"], "int, float, bool or str"),
                       (["--override-kv", "a.b=bool:yes"], "true or false"),
                       (["--override-kv", "a.b=int:x1"], "not a valid int"),
                       (["--override-kv", "general.alignment=int:64"], "general.alignment"),
                       (["--keep-split", "--split-max-size", "1M"], "--keep-split")):
        assert_one_line_error(cli("quantize", tiny_llama, "-o", out, *args), frag)
    assert not out.exists() and leftovers(tmp_path) == []


def test_parse_kv_override_follows_llama_cpp() -> None:
    assert parse_kv_override("a.b=int:42") == ("a.b", 42)
    assert parse_kv_override("a.b=float:0.5") == ("a.b", 0.5)
    assert parse_kv_override("a.b=bool:false") == ("a.b", False)
    assert parse_kv_override("a.b=str:x=y:z") == ("a.b", "x=y:z")  # only the first '=' splits


def test_requantize_warning_only_when_lossy_and_after_checks(tiny_llama_q8: Path, tmp_path: Path) -> None:
    # lossless target: no warning
    proc = cli("quantize", tiny_llama_q8, "-o", tmp_path / "f16.gguf", "--type", "F16", check=True)
    assert "already quantized" not in proc.stderr
    # target type the same as the source's: tensors copied, nothing re-quantized, no warning
    proc = cli("quantize", tiny_llama_q8, "-o", tmp_path / "q8.gguf", "--type", "Q8_0", check=True)
    assert "already quantized" not in proc.stderr
    # an unrelated error comes alone, without the warning before it
    (tmp_path / "exists.gguf").write_bytes(b"x")
    proc = cli("quantize", tiny_llama_q8, "-o", tmp_path / "exists.gguf")
    assert_one_line_error(proc, "already exists")
    assert "warning:" not in proc.stderr
    # a lossy re-quantization warns once; --allow-requantize accepts it silently, same bytes
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    proc = cli("quantize", tiny_llama_q8, "-o", a, check=True)
    assert proc.stderr.count("already quantized") == 1 and "--allow-requantize" in proc.stderr
    proc = cli("quantize", tiny_llama_q8, "-o", b, "--allow-requantize", check=True)
    assert "already quantized" not in proc.stderr
    assert a.read_bytes() == b.read_bytes()
    assert set(tensor_types(a).values()) >= {"Q4_K"}
