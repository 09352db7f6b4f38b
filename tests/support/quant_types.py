"""llama.cpp's own choice of tensor types for a model described only by its hyper-parameters and tensor
shapes (no weights, no file): llama-quant.cpp's llama_quant_compute_types, the entry point of llama.cpp's
test-quant-type-selection, called through ctypes. It exists in the llama.cpp that llama-cpp-python 0.3.36
vendors as C++ symbols (src/llama-ext.h, a staging API), hence the mangled names. Without an imatrix only:
compute_types resets has_imatrix."""

from __future__ import annotations

import ctypes
from pathlib import Path

_MANGLED = {
    "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
    "free": "_Z16llama_quant_freeP19quantize_state_impl",
    "model": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
    "allows": "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
    "compute": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
}


class _Desc(ctypes.Structure):  # llama_quant_model_desc
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (f, ctypes.c_uint32) for f in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")
    ]


class _InitParams(ctypes.Structure):  # ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _libs():
    import llama_cpp
    import llama_cpp.llama_cpp as lc

    llama = lc._lib
    ggml = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))))
    f = {k: getattr(llama, v) for k, v in _MANGLED.items()}
    f["init"].restype = f["model"].restype = ctypes.c_void_p
    f["init"].argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    f["model"].argtypes = [ctypes.POINTER(_Desc)]
    f["free"].argtypes = [ctypes.c_void_p]
    f["allows"].argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    f["allows"].restype = ctypes.c_bool
    f["compute"].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
    llama.llama_model_free.argtypes = [ctypes.c_void_p]
    ggml.ggml_init.argtypes = [_InitParams]
    ggml.ggml_init.restype = ctypes.c_void_p
    ggml.ggml_free.argtypes = [ctypes.c_void_p]
    ggml.ggml_tensor_overhead.restype = ctypes.c_size_t
    ggml.ggml_new_tensor_4d.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 4
    ggml.ggml_new_tensor_4d.restype = ctypes.c_void_p
    ggml.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_type_name.argtypes = [ctypes.c_int]
    ggml.ggml_type_name.restype = ctypes.c_char_p
    return llama, ggml, f


def _layer_then_name(name: str) -> tuple[int, str]:  # llama_model_loader's weight_name_comparer
    return (int(name.split(".")[1]) if name.startswith("blk.") else -1, name)


def llama_cpp_types(tensors: list[tuple[str, tuple[int, ...]]], ftype: int, *, n_layer: int, n_head: int, n_head_kv: int,
                    n_expert: int = 0, n_embd: int = 4096, n_ff: int = 14336) -> dict[str, str]:
    """name -> ggml type name that llama-quantize would give each quantizable tensor of a llama model.
    `tensors`: (name, numpy shape) as in a GGUF (the row length last)."""
    llama, ggml, f = _libs()
    desc = _Desc(b"llama", n_embd, n_ff, n_layer, n_head, n_head_kv, n_expert, n_embd // n_head, n_embd // n_head)
    model = f["model"](ctypes.byref(desc))
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    qs = f["init"](model, ctypes.cast(ctypes.byref(params), ctypes.c_void_p))
    ctx = ggml.ggml_init(_InitParams(len(tensors) * ggml.ggml_tensor_overhead() + 1024, None, True))
    try:
        made = []
        for name, shape in sorted(tensors, key=lambda t: _layer_then_name(t[0])):
            ne = [*reversed(shape), *[1] * (4 - len(shape))]
            t = ggml.ggml_new_tensor_4d(ctx, 0, *ne)  # F32, as a BF16 source would be a non-quantized type too
            ggml.ggml_set_name(t, name.encode())
            if f["allows"](qs, t):
                made.append((name, t))
        ptrs = (ctypes.c_void_p * len(made))(*(t for _, t in made))
        out = (ctypes.c_int * len(made))()
        f["compute"](qs, ftype, ptrs, out, len(made))
        return {name: ggml.ggml_type_name(out[i]).decode().upper() for i, (name, _) in enumerate(made)}
    finally:
        ggml.ggml_free(ctx)
        f["free"](qs)
        llama.llama_model_free(model)
