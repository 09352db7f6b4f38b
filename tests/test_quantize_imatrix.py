"""Importance matrices: llama.cpp's files (made here by the real llama-imatrix, GGUF and legacy .dat) read
as llama-quantize reads them, written as llama-imatrix writes them, and `localmix quantize --imatrix FILE`
byte-identical to `llama-quantize --imatrix FILE` (the vendored tools, tests/support/llama_tools.py);
experts the calibration never reached get llama-quantize's neutral weights; an in-process oracle
(llama_model_quantize given the same weights) where the tools cannot be built; damaged files, imatrices
of another model and types that need one without it refused with one line and nothing written."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantize.convert import convert
from quantize.errors import QuantizeError
from quantize.imatrix import Entry, Imatrix, read_imatrix, write_imatrix
from quantize.recipe import OUT_TYPES
from tests.support.cli import one_line_error, run_cli
from tests.support.ggufs import differences
from tests.support.llama_tools import run_tool

CHUNKS, CTX = 8, 128  # 1024 calibration tokens: a few seconds of llama-imatrix on the tiny Mixtral
TEXTS = Path(__file__).parent.parent / "quantize" / "data" / "text" / "calibration"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Some of the calibration texts (any text would do; these are in the repository)."""
    parts = sorted(TEXTS.glob("*.txt"))
    assert parts, TEXTS
    text = "\n\n".join(p.read_text(encoding="utf-8")[:6000] for p in parts)
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _llama_imatrix(bf16: Path, text: Path, out: Path, *extra: str) -> Path:
    r = run_tool("llama-imatrix", "-m", bf16, "-f", text, "-o", out, "-c", CTX, "--chunks", CHUNKS, "-t", 2, "--no-ppl", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def imatrix_gguf(tiny_gguf, text_file, tmp_path_factory) -> Path:
    return _llama_imatrix(tiny_gguf("BF16"), text_file, tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf")


@pytest.fixture(scope="module")
def imatrix_dat(tiny_gguf, text_file, tmp_path_factory) -> Path:
    return _llama_imatrix(tiny_gguf("BF16"), text_file, tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.dat",
                          "--output-format", "dat")


def _llama_quantize(src: Path, out: Path, out_type: str, imatrix: Path | None):
    args = ["--imatrix", imatrix] if imatrix is not None else []
    return run_tool("llama-quantize", *args, src, out, out_type, 2)


# -- reading ---------------------------------------------------------------------------------------------------


@pytest.mark.llama_tools
def test_reads_what_llama_imatrix_writes(imatrix_gguf, text_file):
    im = read_imatrix(imatrix_gguf)
    assert not im.legacy and (im.chunk_count, im.chunk_size) == (CHUNKS, CTX)
    assert im.datasets == [str(text_file)]
    tokens = CHUNKS * CTX
    for b in range(4):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp"):
            e = im.entries[f"blk.{b}.{name}.weight"]
            assert e.sums.shape == (1, 256) and e.counts.tolist() == [tokens]
        for name, n_per_row in (("ffn_gate_exps", 256), ("ffn_up_exps", 256), ("ffn_down_exps", 512)):
            e = im.entries[f"blk.{b}.{name}.weight"]
            assert e.sums.shape == (8, n_per_row) and e.counts.dtype == np.int64
            assert e.counts.sum() == tokens * 2  # every token goes to its top-2 experts
    assert "token_embd.weight" not in im.entries  # a lookup, not a product
    w = im.weights("blk.0.ffn_up_exps.weight")
    e = im.entries["blk.0.ffn_up_exps.weight"]
    assert w.dtype == np.float32 and w.shape == (8, 256)
    fired = e.counts > 0
    np.testing.assert_array_equal(w[fired], e.sums[fired] / e.counts[fired, None].astype(np.float32))
    assert im.weights("no.such.weight") is None


@pytest.mark.llama_tools
def test_legacy_dat_gives_the_same_weights(imatrix_gguf, imatrix_dat):
    new, old = read_imatrix(imatrix_gguf), read_imatrix(imatrix_dat)
    assert old.legacy and old.chunk_count == CHUNKS and len(old.datasets) == 1
    assert set(old.entries) <= set(new.entries)
    for name, e in old.entries.items():
        w_new, w_old = new.weights(name), old.weights(name)
        assert e.counts.shape == (1,) and e.sums.shape == (1, w_new.size)  # .dat does not say how many experts
        # .dat stores (sum / count) * ncall; read back / ncall: the same means, to float rounding
        np.testing.assert_allclose(w_old.reshape(w_new.shape), w_new, rtol=2e-6)


@pytest.mark.llama_tools
def test_written_imatrix_is_byte_identical_to_llama_imatrix(imatrix_gguf, tmp_path):
    out = tmp_path / "again.imatrix.gguf"
    write_imatrix(read_imatrix(imatrix_gguf), out)
    assert out.read_bytes() == imatrix_gguf.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_write_and_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    im = Imatrix(
        {"blk.0.ffn_up_exps.weight": Entry(rng.uniform(0, 9, (4, 64)).astype(np.float32), np.array([5, 0, 7, 1_000_000], np.int64)),
         "blk.0.attn_q.weight": Entry(rng.uniform(0, 9, (1, 64)).astype(np.float32), np.array([12], np.int64))},
        chunk_count=3, chunk_size=512, datasets=["a.txt", "b.txt"],
    )
    write_imatrix(im, tmp_path / "x.gguf")
    back = read_imatrix(tmp_path / "x.gguf")
    assert (back.chunk_count, back.chunk_size, back.datasets) == (3, 512, ["a.txt", "b.txt"])
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    w = back.weights("blk.0.ffn_up_exps.weight")
    assert (w[1] == 1.0).all()  # the expert no token reached: llama-quantize's neutral weights
    np.testing.assert_array_equal(w[0], im.entries["blk.0.ffn_up_exps.weight"].sums[0] / np.float32(5))


# -- quantizing with one: byte-identical to llama-quantize ---------------------------------------------------------


@pytest.mark.llama_tools
@pytest.mark.parametrize("out_type", ["Q4_K_M", "IQ4_XS", "Q3_K_S", "IQ2_M"])
def test_byte_identical_to_llama_quantize(tiny_gguf, imatrix_gguf, tmp_path, out_type):
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    r = _llama_quantize(tiny_gguf("BF16"), theirs, out_type, imatrix_gguf)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = run_cli("quantize", str(tiny_gguf.src), "-o", str(ours), "--type", out_type, "--imatrix", str(imatrix_gguf))
    assert r.returncode == 0, r.stderr
    assert differences(ours, theirs) == []
    if out_type != "IQ2_M":  # (IQ2_M cannot be made without one) the imatrix changed the result
        assert differences(ours, tiny_gguf(out_type))


@pytest.mark.llama_tools
def test_legacy_dat_byte_identical_to_llama_quantize(tiny_gguf, imatrix_dat, tmp_path):
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    assert _llama_quantize(tiny_gguf("BF16"), theirs, "Q4_K_M", imatrix_dat).returncode == 0
    convert(tiny_gguf.src, ours, "Q4_K_M", importance=read_imatrix(imatrix_dat))
    assert differences(ours, theirs) == []


@pytest.mark.llama_tools
def test_experts_never_reached_get_neutral_weights(tiny_gguf, imatrix_gguf, tmp_path):
    """An imatrix in which expert 3 of layer 1 never fired (its counts 0, as llama-imatrix writes it for an
    expert the text never routed to): llama-quantize gives that expert weights of 1; so do we."""
    im = read_imatrix(imatrix_gguf)
    for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        e = im.entries[name]
        e.counts[3] = 0
        e.sums[3] = 0.0
    edited = tmp_path / "edited.imatrix.gguf"
    write_imatrix(im, edited)
    assert (read_imatrix(edited).weights("blk.1.ffn_up_exps.weight")[3] == 1.0).all()
    theirs, ours, plain = tmp_path / "theirs.gguf", tmp_path / "ours.gguf", tmp_path / "plain.gguf"
    assert _llama_quantize(tiny_gguf("BF16"), theirs, "Q4_K_M", edited).returncode == 0
    convert(tiny_gguf.src, ours, "Q4_K_M", importance=read_imatrix(edited))
    assert differences(ours, theirs) == []
    convert(tiny_gguf.src, plain, "Q4_K_M", importance=read_imatrix(imatrix_gguf))
    changed = sorted(d.split(":")[0] for d in differences(ours, plain))
    assert changed == [f"blk.1.{n}.weight" for n in ("ffn_down_exps", "ffn_gate_exps", "ffn_up_exps")]


# -- the in-process oracle: llama_model_quantize given the same weights -------------------------------------------------


def _random_imatrix(src: Path, seed: int = 0, zero_expert: int | None = None) -> Imatrix:
    """Sums and counts for every matrix of the GGUF at `src` as llama-imatrix would keep them (random)."""
    rng = np.random.default_rng(seed)
    entries = {}
    for t in gguf.GGUFReader(src).tensors:
        if len(t.shape) < 2 or t.name == "token_embd.weight":
            continue
        n_mat = int(t.shape[2]) if len(t.shape) > 2 else 1
        counts = rng.integers(1, 5000, n_mat).astype(np.int64)
        if zero_expert is not None and n_mat > 1:
            counts[zero_expert] = 0
        sums = (rng.uniform(0.01, 3.0, (n_mat, int(t.shape[0]))) * counts[:, None]).astype(np.float32)
        entries[t.name] = Entry(sums, counts)
    return Imatrix(entries, chunk_count=4, chunk_size=512, datasets=["random"])


def _llama_model_quantize(src: Path, dst: Path, out_type: str, im: Imatrix) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = OUT_TYPES[out_type].ftype, 2
    keep = {name: np.ascontiguousarray(im.weights(name).reshape(-1)) for name in im.entries}  # alive through the call
    entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for e, (name, w) in zip(entries, keep.items()):
        e.name, e.data, e.size = name.encode(), w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), w.size
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))


def test_same_bytes_as_llama_model_quantize_with_the_same_weights(tiny_gguf, tmp_path):
    im = _random_imatrix(tiny_gguf("BF16"), zero_expert=5)
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    assert _llama_model_quantize(tiny_gguf("BF16"), theirs, "Q4_K_M", im) == 0
    convert(tiny_gguf.src, ours, "Q4_K_M", importance=im)
    assert differences(ours, theirs) == []


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-layer tiny Mixtral with rows of 288 (as the upcycled SmolLM2's 576, which 256 does not divide),
    and its BF16 GGUF: the fallback types at a fraction of the upcycled model's cost."""
    from tests.support.checkpoints import make_tiny_mixtral

    folder = tmp_path_factory.mktemp("odd")
    src = make_tiny_mixtral(folder / "odd", layers=2, hidden=288)
    convert(src, folder / "bf16.gguf", "BF16")
    return src, folder / "bf16.gguf"


@pytest.mark.parametrize("out_type, fallbacks", [("Q4_K_M", ["Q5_0", "Q5_1"]), ("IQ4_XS", ["IQ4_NL"]), ("IQ3_XXS", ["IQ4_NL"])])
def test_fallback_types_with_an_imatrix(odd, tmp_path, out_type, fallbacks):
    """The fallback types take the weights too; IQ3_XXS (needs an imatrix) on the 512-wide ffn_down rows,
    with an expert that never fired."""
    src, bf16 = odd
    im = _random_imatrix(bf16, seed=1, zero_expert=2)
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    assert _llama_model_quantize(bf16, theirs, out_type, im) == 0
    s = convert(src, ours, out_type, importance=im)
    assert all(s.types[t] > 0 for t in fallbacks) and differences(ours, theirs) == []
    if out_type == "IQ3_XXS":
        assert s.types["IQ3_XXS"] > 0


def test_metadata_as_llama_quantize_writes_it(tiny, tiny_gguf, tmp_path):
    from tests.support.ggufs import metadata

    im = _random_imatrix(tiny_gguf("BF16"))
    im.source = "calib/tiny.imatrix.gguf"
    convert(tiny, tmp_path / "m.gguf", "Q4_K_M", importance=im)
    m = metadata(tmp_path / "m.gguf")
    assert m["quantize.imatrix.file"] == "calib/tiny.imatrix.gguf"
    assert m["quantize.imatrix.dataset"] == "random"
    assert m["quantize.imatrix.entries_count"] == len(im.entries)
    assert m["quantize.imatrix.chunks_count"] == 4
    assert "localmix.routing.expert_counts" not in m  # a file has no routing counts


class _Routed(Imatrix):
    """An Importance that also counts routing (as the calibration does): the counts are patched in after the pass."""

    def __init__(self, base: Imatrix, counts: np.ndarray):
        super().__init__(base.entries, base.chunk_count, base.chunk_size, base.datasets, "auto", routing_tokens=1000)
        self.counts, self.asked = counts, []

    def weights(self, name):
        self.asked.append(name)
        return super().weights(name)

    def routing_shape(self):
        return self.counts.shape

    def routing(self):
        return self.counts


def test_routing_counts_patched_into_the_last_key(tiny, tiny_gguf, tmp_path):
    from llama_cpp import Llama

    from tests.support.ggufs import metadata

    counts = np.arange(32, dtype=np.uint64).reshape(4, 8) * 7 + 1
    imp = _Routed(_random_imatrix(tiny_gguf("BF16")), counts)
    convert(tiny, tmp_path / "m.gguf", "Q4_K_M", importance=imp)
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys[-1] == "localmix.routing.expert_counts"
    m = metadata(tmp_path / "m.gguf")
    assert m["localmix.routing.expert_counts"] == counts.reshape(-1).tolist() and m["localmix.routing.tokens"] == 1000
    # once per quantized tensor (not the F32 routers and norms), in file order
    assert imp.asked == [t.name for t in r.tensors if len(t.shape) >= 2 and "ffn_gate_inp" not in t.name]
    Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False).close()  # llama.cpp reads the header


# -- refusals ----------------------------------------------------------------------------------------------------


def _clean(r, out: Path, expect: str):
    assert one_line_error(r, expect), r.stderr
    assert not out.exists() and not [p for p in out.parent.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("out_type", ["IQ2_M", "IQ3_XXS"])
def test_types_that_need_an_imatrix_refused_without_one(tiny, tmp_path, out_type):
    out = tmp_path / "m.gguf"
    _clean(run_cli("quantize", str(tiny), "-o", str(out), "--type", out_type), out, f"{out_type} needs an importance matrix")


def test_imatrix_of_another_model_refused(tiny, tmp_path):
    """An imatrix of the upcycled SmolLM2 (hidden 576) for the tiny Mixtral (hidden 256): llama-quantize's
    size check, before a byte is written."""
    rng = np.random.default_rng(0)
    im = Imatrix({f"blk.{b}.{n}.weight": Entry(rng.uniform(0, 1, (k, 576)).astype(np.float32), np.ones(k, np.int64))
                  for b in range(30) for n, k in (("attn_q", 1), ("ffn_up_exps", 8))}, 1, 512, ["x"])
    write_imatrix(im, tmp_path / "smol.imatrix.gguf")
    out = tmp_path / "m.gguf"
    r = run_cli("quantize", str(tiny), "-o", str(out), "--imatrix", str(tmp_path / "smol.imatrix.gguf"))
    _clean(r, out, "imatrix size 576 is different from tensor size 256 for blk.0.attn_q.weight")


def test_missing_entry_for_a_tensor_that_needs_one(tiny, tiny_gguf, tmp_path):
    im = _random_imatrix(tiny_gguf("BF16"))
    del im.entries["blk.2.ffn_up_exps.weight"]
    with pytest.raises(QuantizeError, match="no entry for blk.2.ffn_up_exps.weight"):
        convert(tiny, tmp_path / "m.gguf", "IQ2_M", importance=im)
    assert list(tmp_path.iterdir()) == []


def _gguf_imatrix(path: Path, tensors: dict[str, np.ndarray], keys: bool = True) -> Path:
    w = gguf.GGUFWriter(path, arch="llama")
    if keys:
        w.add_array("imatrix.datasets", ["x"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _dat(path: Path, entries: list[tuple[bytes, int, list[float]]], n: int | None = None, tail: bytes = b"") -> Path:
    data = struct.pack("<i", len(entries) if n is None else n)
    for name, ncall, vals in entries:
        data += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, len(vals)) + np.asarray(vals, "<f4").tobytes()
    path.write_bytes(data + tail)
    return path


def _cut(path: Path, n: int) -> Path:
    path.write_bytes(path.read_bytes()[:-n])
    return path


ONES, C2 = np.ones((2, 4), np.float32), np.ones((2, 1), np.float32)  # sums of 2 experts, their counts
BAD_FILES = {
    "empty": lambda p: (p.write_bytes(b""), p)[1],
    "text": lambda p: (p.write_text("hello, this is not an imatrix\n"), p)[1],
    "a model": lambda p: _gguf_imatrix(p, {"blk.0.attn_q.weight": ONES}, keys=False),
    "sums without counts": lambda p: _gguf_imatrix(p, {"a.weight.in_sum2": ONES}),
    "NaN sums": lambda p: _gguf_imatrix(p, {"a.weight.in_sum2": np.full((2, 4), np.nan, np.float32), "a.weight.counts": C2}),
    "negative counts": lambda p: _gguf_imatrix(p, {"a.weight.in_sum2": ONES, "a.weight.counts": -C2}),
    "sums not fitting counts": lambda p: _gguf_imatrix(p, {"a.weight.in_sum2": np.ones(7, np.float32), "a.weight.counts": C2}),
    "F16 sums": lambda p: _gguf_imatrix(p, {"a.weight.in_sum2": ONES.astype(np.float16), "a.weight.counts": C2}),
    "no entries": lambda p: _gguf_imatrix(p, {"something.else": ONES}),
    "truncated GGUF": lambda p: _cut(_gguf_imatrix(p, {"a.weight.in_sum2": ONES, "a.weight.counts": C2}), 40),
    "truncated dat": lambda p: _cut(_dat(p, [(b"a.weight", 1, [1.0] * 16)]), 7),
    "dat with a negative count": lambda p: _dat(p, [(b"a.weight", 1, [1.0])], n=-3),
    "dat with a huge name": lambda p: (p.write_bytes(struct.pack("<ii", 1, 1 << 30) + b"abc"), p)[1],
    "dat with NaN": lambda p: _dat(p, [(b"a.weight", 1, [float("nan")])]),
    "dat with a negative ncall": lambda p: _dat(p, [(b"a.weight", -1, [1.0])]),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_damaged_imatrix_files_are_one_line(tmp_path, kind):
    path = BAD_FILES[kind](tmp_path / "bad.imatrix")
    with pytest.raises(QuantizeError) as e:
        read_imatrix(path)
    assert "\n" not in str(e.value) and "bad.imatrix" in str(e.value)


def test_damaged_imatrix_refused_by_the_command_before_anything(tiny, tmp_path):
    path = BAD_FILES["NaN sums"](tmp_path / "nan.imatrix.gguf")
    out = tmp_path / "m.gguf"
    _clean(run_cli("quantize", str(tiny), "-o", str(out), "--imatrix", str(path)), out, "NaN")
    _clean(run_cli("quantize", str(tiny), "-o", str(out), "--imatrix", str(tmp_path / "none.gguf")), out, "cannot read imatrix")


def test_dat_reads_with_and_without_its_trailer(tmp_path):
    plain = read_imatrix(_dat(tmp_path / "a.dat", [(b"x.weight", 4, [8.0, 2.0])]))
    assert plain.legacy and plain.chunk_count == 0 and plain.datasets == []
    np.testing.assert_array_equal(plain.weights("x.weight"), [[2.0, 0.5]])
    trailer = struct.pack("<ii", 9, 5) + b"t.txt"
    full = read_imatrix(_dat(tmp_path / "b.dat", [(b"x.weight", 0, [8.0, 2.0])], tail=trailer))
    assert (full.chunk_count, full.datasets) == (9, ["t.txt"])
    np.testing.assert_array_equal(full.weights("x.weight"), [[8.0, 2.0]])  # ncall 0: the values as read


def _mutations(seed: int, n: int, good: bytes):
    """Seeded damage to a good file: bytes flipped, runs overwritten with extreme values, cut short, spliced."""
    rng = np.random.default_rng(seed)
    extremes = [struct.pack("<q", v) for v in (-1, 0, 1 << 40, 1 << 62, 0x7FFFFFFF)]
    extremes += [struct.pack("<f", v) for v in (np.nan, np.inf, -1.0)]
    for i in range(n):
        data = bytearray(good)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.integers(1, 8)):
                data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            v = extremes[rng.integers(len(extremes))]
            at = int(rng.integers(len(data) - len(v)))
            data[at : at + len(v)] = v
        elif kind == 2:
            data = data[: rng.integers(len(data))]
        else:
            a, b = sorted(rng.integers(len(data), size=2))
            data = data[:a] + data[b:] + data[a:b]
        yield f"{kind}:{i}", bytes(data)


def test_damaged_files_are_read_or_refused_never_a_crash(tmp_path):
    """A few hundred seeded mutations of a small GGUF imatrix and a .dat: each is read (and its weights are
    finite float32) or refused with a QuantizeError of one line; never another exception."""
    rng = np.random.default_rng(1)
    im = Imatrix({"blk.0.ffn_up_exps.weight": Entry(rng.uniform(0, 9, (4, 32)).astype(np.float32), np.array([5, 0, 7, 9], np.int64)),
                  "blk.0.attn_q.weight": Entry(rng.uniform(0, 9, (1, 32)).astype(np.float32), np.array([12], np.int64))},
                 chunk_count=3, chunk_size=512, datasets=["a.txt"])
    write_imatrix(im, tmp_path / "good.gguf")
    dat = _dat(tmp_path / "good.dat", [(b"blk.0.attn_q.weight", 3, list(rng.uniform(0, 9, 32))), (b"x.weight", 1, [1.0] * 8)],
               tail=struct.pack("<ii", 3, 5) + b"a.txt")
    seen = {"read": 0, "refused": 0}
    for good in (tmp_path / "good.gguf", dat):
        for label, data in _mutations(7, 200, good.read_bytes()):
            path = tmp_path / "bad.imatrix"
            path.write_bytes(data)
            try:
                got = read_imatrix(path)
            except QuantizeError as e:
                assert "\n" not in str(e), label
                seen["refused"] += 1
                continue
            for name in got.entries:
                w = got.weights(name)
                assert w.dtype == np.float32 and np.isfinite(w).all(), label
            seen["read"] += 1
    assert seen["refused"] > 100 and seen["read"] > 10, seen


class _Forgetful(Imatrix):
    """An Importance computed as the pass goes that has nothing for one tensor (as a calibration could)."""

    def weights(self, name):
        return None if name == "blk.1.ffn_down_exps.weight" else super().weights(name)


def test_weights_missing_in_the_pass_for_a_type_that_needs_them(tiny, tiny_gguf, tmp_path):
    base = _random_imatrix(tiny_gguf("BF16"))
    imp = _Forgetful(base.entries, base.chunk_count, base.chunk_size, base.datasets, "auto")
    with pytest.raises(QuantizeError, match="no importance weights for blk.1.ffn_down_exps.weight, which IQ2_M makes IQ2_S"):
        convert(tiny, tmp_path / "m.gguf", "IQ2_M", importance=imp)
    assert list(tmp_path.iterdir()) == []


def test_a_model_given_as_imatrix_is_told_so(tiny_gguf):
    """A quantized model is no imatrix: said from its metadata, before its tensor data is read."""
    with pytest.raises(QuantizeError, match="no imatrix metadata .*is it a model"):
        read_imatrix(tiny_gguf("Q4_K_M"))
