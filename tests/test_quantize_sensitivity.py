"""quantize/sensitivity.py: each tensor's error at each candidate type, measured on the upcycled SmolLM2's real
weights with llama.cpp's kernels (or the Gaussian prior from shapes alone)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from safetensors.numpy import save_file

from quantize.checkpoint import SafetensorsFile, open_checkpoint, to_f32
from quantize.convert import OutTensor, plan_tensors
from quantize.errors import QuantizeError
from quantize.ggml import quantize_rows
from quantize.imatrix import Entry, Imatrix
from quantize.metadata import read_hparams
from quantize.recipe import NEEDS_IMATRIX, OUT_TYPES, block_size, is_quantized, row_bytes
from quantize.sensitivity import LADDER, ROLE_WEIGHTS, estimate, measure, prior, total_error

Q_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"]
IQ_MIXES = ["IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_M", "IQ3_XXS", "IQ2_M"]


@pytest.fixture(scope="module")
def checkpoint(upcycled):
    ck = open_checkpoint(upcycled)
    yield ck, read_hparams(ck.config)
    ck.close()


@pytest.fixture(scope="module")
def tensors(checkpoint) -> list[OutTensor]:
    return plan_tensors(*checkpoint, "Q4_K_M")


@pytest.fixture(scope="module")
def measured(tensors):
    """Every tensor of the upcycled SmolLM2, unweighted (about 2 s on 2 cores)."""
    return {u.name: u for u in measure(tensors, threads=2)}


def synthetic_imatrix(tensors: list[OutTensor]) -> Imatrix:
    """Importance weights for every quantizable tensor but token_embd (as llama-imatrix gives), far from uniform."""
    entries = {}
    for t in tensors:
        if len(t.shape) >= 2 and t.name != "token_embd.weight" and "ffn_gate_inp" not in t.name:
            rng = np.random.default_rng(zlib.crc32(t.name.encode()))
            sums = rng.lognormal(0.0, 1.0, (t.n_mat, t.ne0)).astype(np.float32)
            entries[t.name] = Entry(sums, np.ones(t.n_mat, dtype=np.int64))
    return Imatrix(entries, source="synthetic")


def layers(tensors: list[OutTensor], keep: set[int]) -> list[OutTensor]:
    return [t for t in tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) in keep]


@pytest.fixture(scope="module")
def weighted(checkpoint):
    """Layers 0 and 29 and token_embd with importance weights (IQ types offered): (units, tensors, imatrix)."""
    ts = layers(plan_tensors(*checkpoint, "Q4_K_M", has_imatrix=True), {0, 29})
    im = synthetic_imatrix(ts)
    return {u.name: u for u in measure(ts, im, threads=2)}, ts, im


@pytest.mark.parametrize("mix", Q_MIXES)
def test_every_recipe_type_of_a_uniform_mix_is_an_option(checkpoint, measured, mix):
    planned = plan_tensors(*checkpoint, mix)
    types = {t.name: t.type for t in planned if t.name in measured}
    assert set(types) == set(measured)  # every quantizable tensor is a unit
    for name, t in types.items():
        assert measured[name].option(t).type == t
    err = total_error(list(measured.values()), types)
    assert math.isfinite(err) and err > 0


@pytest.mark.parametrize("mix", IQ_MIXES + ["Q4_0", "Q4_K_M", "Q2_K"])
def test_recipe_types_with_an_imatrix_are_options(checkpoint, weighted, mix):
    units, ts, _ = weighted
    planned = {t.name: t.type for t in layers(plan_tensors(*checkpoint, mix, has_imatrix=True), {0, 29}) if t.name in units}
    assert set(planned) == set(units)
    assert total_error(list(units.values()), planned) > 0  # KeyError if a recipe type were not a candidate


def test_ladder_holds_every_type_the_recipe_gives():
    from quantize.recipe import ModelShape, tensor_type

    names = ["token_embd.weight", "output.weight"] + [f"blk.{i}.{r}.weight" for i in (0, 5, 31) for r in ROLE_WEIGHTS]
    given = set()
    for mix, out in OUT_TYPES.items():
        for model in (ModelShape(32, 8, 32, 8, False), ModelShape(32, 1, 32, 32, True), ModelShape(80, 1, 64, 8, False)):
            for name in names:
                for ne0 in (4096, 576, 14336):
                    for imatrix in (False, True):
                        t = tensor_type(name, ne0, 2, T.BF16, mix, model, imatrix)
                        if is_quantized(t) and is_quantized(out.base):
                            given.add(t)
    assert given <= set(LADDER), given - set(LADDER)


def test_errors_ordered_by_bits_with_margins(measured):
    down = measured["blk.15.ffn_down_exps.weight"]  # 1536-wide rows: the k-quants fit
    e = {o.type: o.error for o in down.options}
    assert e[T.Q8_0] * 5 < e[T.Q6_K] and e[T.Q6_K] < e[T.Q3_K] / 10 and e[T.Q3_K] * 2 < e[T.Q2_K]
    assert e[T.Q4_K] * 5 < e[T.Q2_K]
    attn = measured["blk.15.attn_output.weight"]  # 576-wide: only the 32-block types
    a = {o.type: o.error for o in attn.options}
    assert set(a) == {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
    assert a[T.Q8_0] * 10 < a[T.Q5_0] and a[T.Q5_0] * 2 < a[T.Q4_0]
    assert all(u.measured for u in measured.values())


def _whole_tensor_nsr(t: OutTensor, ty: T) -> float:
    """The oracle: every row of every expert quantized and dequantized, experts weighing equally."""
    num = den = 0.0
    for ref in t.parts:
        raw = ref.file.raw(ref)
        x = to_f32(ref, raw.reshape(-1, raw.shape[-1]))
        d = dequantize(quantize_rows(int(ty), x).reshape(x.shape[0], -1), ty) - x
        num += float(np.sum(d.astype(np.float64) ** 2))
        den += float(np.sum(x.astype(np.float64) ** 2))
    return num / den


@pytest.mark.parametrize("name, ty", [("blk.7.ffn_down_exps.weight", T.Q2_K), ("blk.7.ffn_down_exps.weight", T.Q4_K),
                                      ("blk.7.attn_q.weight", T.Q4_0), ("token_embd.weight", T.Q5_0)])
def test_sampled_rows_estimate_the_whole_tensor(tensors, measured, name, ty):
    t = next(t for t in tensors if t.name == name)
    got = measured[name].option(ty).error / ROLE_WEIGHTS[measured[name].role]
    assert got == pytest.approx(_whole_tensor_nsr(t, ty), rel=0.1)


def test_options_are_types_llama_cpp_accepts_with_their_sizes(tensors, measured):
    by_name = {t.name: t for t in tensors}
    for u in measured.values():
        t = by_name[u.name]
        assert [o.nbytes for o in u.options] == sorted(o.nbytes for o in u.options)
        assert u.n_elements == t.n_elements and u.layer == (int(u.name.split(".")[1]) if u.name.startswith("blk.") else -1)
        raw = t.parts[0].file.raw(t.parts[0])
        row = np.ascontiguousarray(to_f32(t.parts[0], raw.reshape(-1, raw.shape[-1])[:1]))
        for o in u.options:
            assert t.ne0 % block_size(o.type) == 0 and o.type not in NEEDS_IMATRIX
            assert o.nbytes == t.n_elements // t.ne0 * quantize_rows(int(o.type), row).nbytes


def test_deterministic_whatever_the_threads(checkpoint, weighted):
    units, ts, im = weighted
    again = measure(ts, im, threads=1)
    assert [u.name for u in again] == list(units)
    assert again == list(units.values())  # the same floats, bit for bit
    assert estimate(ts) == estimate(ts)


def test_importance_gates_the_i_quants(weighted):
    units, _, _ = weighted
    embd = units["token_embd.weight"]  # no weights for it: the i-quants that need none only
    assert {o.type for o in embd.options} >= {T.IQ4_NL} and not {o.type for o in embd.options} & NEEDS_IMATRIX
    down = units["blk.0.ffn_down_exps.weight"]
    assert {T.IQ2_XXS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS, T.IQ4_NL} <= {o.type for o in down.options}
    e = {o.type: o.error for o in down.options}
    assert e[T.IQ3_XXS] < e[T.IQ2_XXS] / 2 and e[T.Q8_0] * 10 < e[T.IQ4_XS]


def test_routing_weighs_experts(checkpoint, tensors):
    t = next(t for t in tensors if t.name == "blk.3.ffn_down_exps.weight")
    one = OutTensor(t.name, t.shape[1:], t.type, t.parts[2:3], stored=t.stored)  # expert 2 alone
    routing = np.zeros((30, 8), dtype=np.uint64)
    routing[3, 2] = 100
    per_expert = 40 * t.ne0  # 40 rows of each expert: the same rows of expert 2 both ways
    stacked = measure([t], routing=routing, elements=8 * per_expert, threads=2)[0]
    alone = measure([one], elements=per_expert, threads=2)[0]
    assert [o.error for o in stacked.options] == pytest.approx([o.error for o in alone.options], rel=1e-12)
    uniform = measure([t], elements=8 * per_expert, threads=2)[0]
    assert [o.error for o in uniform.options] != [o.error for o in stacked.options]


def _safetensors(tmp_path, arrays: dict[str, np.ndarray]) -> SafetensorsFile:
    path = tmp_path / "w.safetensors"
    save_file(arrays, str(path))
    return SafetensorsFile.open(path)


def test_all_zero_rows_get_the_prior(tmp_path):
    rng = np.random.default_rng(0)
    f = _safetensors(tmp_path, {"z": np.zeros((64, 512), np.float32), "r": rng.standard_normal((64, 512)).astype(np.float32)})
    zero = OutTensor("blk.0.attn_q.weight", (64, 512), T.Q4_K, [f.tensors["z"]], stored=T.F32)
    some = OutTensor("blk.0.ffn_up_exps.weight", (2, 64, 512), T.Q4_K, [f.tensors["z"], f.tensors["r"]], stored=T.F32)
    u, v = measure([zero, some], threads=2)
    assert not u.measured and [o.error for o in u.options] == [ROLE_WEIGHTS["attn_q"] * prior(o.type) for o in u.options]
    assert v.measured  # one expert of zeros, the other random: measured
    f.close()


def test_non_finite_weights_are_one_line_error(tmp_path):
    w = np.ones((8, 256), np.float32)
    w[5, 7] = np.nan
    f = _safetensors(tmp_path, {"model.layers.0.mlp.up_proj.weight": w})
    t = OutTensor("blk.0.ffn_up.weight", (8, 256), T.Q4_K, list(f.tensors.values()), stored=T.F32)
    with pytest.raises(QuantizeError, match="NaN or infinite") as e:
        measure([t], threads=1)
    assert "\n" not in str(e.value)
    f.close()


def test_estimate_from_shapes_alone():
    table = [  # Mixtral 8x22B's shapes, no weights to read
        OutTensor("token_embd.weight", (32768, 6144), T.Q4_K, [], stored=T.BF16),
        OutTensor("blk.0.attn_norm.weight", (6144,), T.F32, [], stored=T.F32),
        OutTensor("blk.0.ffn_gate_inp.weight", (8, 6144), T.F32, [], stored=T.F32),
        OutTensor("blk.0.attn_q.weight", (6144, 6144), T.Q4_K, [], stored=T.BF16),
        OutTensor("blk.0.ffn_down_exps.weight", (8, 6144, 16384), T.Q4_K, [], stored=T.BF16),
        OutTensor("blk.0.ffn_up_exps.weight", (8, 16384, 6144), T.Q4_K, [], stored=T.BF16),
        OutTensor("blk.1.attn_k.weight", (1024, 100), T.F16, [], stored=T.BF16),  # no ladder type fits 100
    ]
    units = estimate(table)
    assert [u.name for u in units] == [table[i].name for i in (0, 3, 4, 5)]
    for u, t in zip(units, [table[i] for i in (0, 3, 4, 5)], strict=True):
        assert not u.measured and u.n_elements == t.n_elements
        assert [o.type for o in u.options if o.type.name.startswith("IQ")] == []
        assert set(o.type for o in u.options) == {T.Q2_K, T.Q3_K, T.Q4_0, T.Q4_K, T.Q4_1, T.Q5_0, T.Q5_K, T.Q5_1, T.Q6_K, T.Q8_0}
        for o in u.options:
            assert o.nbytes == t.n_elements // t.ne0 * row_bytes(o.type, t.ne0)
            assert o.error == ROLE_WEIGHTS[u.role] * prior(o.type)
    with_im = estimate(table, has_importance=True)
    assert T.IQ2_XXS in {o.type for o in with_im[2].options}
    assert not {o.type for o in with_im[0].options} & NEEDS_IMATRIX and T.IQ4_XS in {o.type for o in with_im[0].options}
    p = {t: prior(t) for t in LADDER}
    assert p[T.Q8_0] * 10 < p[T.Q6_K] and p[T.Q6_K] * 2 < p[T.Q5_K] < p[T.Q4_K] < p[T.Q3_K] < p[T.Q2_K]
