"""What the planner and the prompt need to know about a model: its hyper-parameters, its tensor table
with each tensor's role for placement, and how to format a conversation for it. Pure data, made from a
ModelFile (or, in tests, from tables of real shapes without any file). The ModelFile's header has been
checked (localmix/validate.py): the keys read here have their types and agree with the tensors. The
model's name is kept as it may be shown (text.shown: no control characters, bounded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .errors import ModelFileError
from .modelfile import ModelFile, open_model_file
from .prompt import PromptFormat
from .prompt.mistral import CONTROL
from .text import shown

# Roles a tensor plays for placement. `expert`: one of a layer's stacked expert tensors (only
# n_expert_used / n_expert of it is read per token); `embed`: the input embedding, which llama.cpp
# always keeps in host memory; `dense`: everything else (attention, norms, routers, output).
EXPERT_SUFFIXES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


@dataclass(frozen=True)
class Tensor:
    name: str
    nbytes: int
    layer: int  # -1 for whole-model tensors
    role: str  # "expert", "dense" or "embed"
    type: str = ""
    n_elements: int = 0
    part: int = 0  # which file of a split model holds it

    @property
    def expert_kind(self) -> str:
        """'gate', 'up' or 'down' for an expert tensor."""
        return self.name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")


@dataclass(frozen=True)
class Target:
    """What a mixed-precision file was made for (`quantize --bpw` / `--for`: the localmix.target.* keys).
    Informative only: a key of another type or out of range is left out (None), never refused."""

    kind: str  # "bpw" or "machine"
    bpw: float | None = None
    vram: int | None = None  # bytes
    ram: int | None = None
    ram_bandwidth: float | None = None  # bytes/s, the machine's read bandwidth
    ctx: int | None = None
    tps: float | None = None  # the decode speed asked for (None: none asked)
    predicted_decode_tps: float | None = None
    predicted_error: float | None = None  # estimated mean KLD (quantize.sensitivity)
    reference_error: float | None = None  # the same estimate for the uniform reference mix


@dataclass(frozen=True)
class ModelInfo:
    path: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_expert: int
    n_expert_used: int
    n_ctx_train: int
    n_vocab: int
    tensors: tuple[Tensor, ...] = field(repr=False)
    name: str = ""
    file_type: str = ""
    prompt: PromptFormat = field(default_factory=PromptFormat, repr=False)
    # How often each expert of each layer was chosen while quantize calibrated the model (one row per
    # layer), over `routing_tokens` tokens; empty when the file carries no such statistics.
    routing: tuple[tuple[int, ...], ...] = field(default=(), repr=False)
    routing_tokens: int = 0
    target: Target | None = field(default=None, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 1

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def native_tools(self) -> bool:
        return self.prompt.native_tools

    @cached_property
    def tied_embeddings(self) -> bool:
        """No output.weight: llama.cpp computes the logits with token_embd (as TENSOR_DUPLICATED)."""
        names = {t.name for t in self.tensors}
        return "token_embd.weight" in names and "output.weight" not in names

    def read_fraction(self, t: Tensor) -> float:
        """Share of a tensor read for one token of decode."""
        if t.role == "expert" and self.n_expert:
            return self.n_expert_used / self.n_expert
        if t.role == "embed":
            return 1.0 if self.tied_embeddings else 0.0  # the output matrix too, or one row
        return 1.0


def role(name: str) -> str:
    if name.endswith(EXPERT_SUFFIXES):
        return "expert"
    if name == "token_embd.weight":
        return "embed"
    return "dense"


def layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if name.startswith("blk.") and len(parts) > 2 and parts[1].isdigit() else -1


ROUTING_COUNTS = "localmix.routing.expert_counts"  # written by quantize --imatrix auto
ROUTING_TOKENS = "localmix.routing.tokens"


def routing_table(kv: dict, n_layer: int, n_expert: int) -> tuple[tuple[int, ...], ...]:
    """The routing statistics as rows of per-expert counts, or () when absent or not of the model's
    shape (they are informative only: a file with odd ones still loads)."""
    counts = kv.get(ROUTING_COUNTS)
    if (not isinstance(counts, list) or n_expert < 2 or len(counts) != n_layer * n_expert
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
        return ()
    return tuple(tuple(counts[i * n_expert:(i + 1) * n_expert]) for i in range(n_layer))


TARGET = "localmix.target."  # written by quantize --bpw / --for
_TARGET_INTS = ("vram", "ram", "ctx")
_TARGET_FLOATS = ("bpw", "ram_bandwidth", "tps", "predicted_decode_tps", "predicted_error", "reference_error")


def target_of(kv: dict) -> Target | None:
    """The localmix.target.* keys as a Target, or None when the file has no (recognisable) kind."""
    import math

    kind = kv.get(TARGET + "kind")
    if kind not in ("bpw", "machine"):
        return None

    def number(key: str, kinds: tuple):
        v = kv.get(TARGET + key)
        ok = isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        return v if ok else None

    values = {k: number(k, (int,)) for k in _TARGET_INTS} | {k: number(k, (int, float)) for k in _TARGET_FLOATS}
    if values["tps"] == 0:
        values["tps"] = None  # 0 is written for "no speed asked for"
    return Target(kind, **values)


def model_info(mf: ModelFile) -> ModelInfo:
    try:
        return _model_info(mf)
    except (TypeError, ValueError, OverflowError):  # a ModelFile made without open_model_file's checks
        arch = shown(mf.kv.get("general.architecture", "?"), 40)
        raise ModelFileError(f"{mf.path}: GGUF metadata lacks the model's shape ({arch}.block_count)") from None


def _model_info(mf: ModelFile) -> ModelInfo:
    kv = mf.kv
    arch = str(kv.get("general.architecture", "?"))

    def a(key, default=None):
        return kv.get(f"{arch}.{key}", default)

    def most(key, default=0) -> int:  # a per-layer key (a list) as its largest value: what sizes memory
        value = a(key, default)
        return max(value, default=0) if isinstance(value, list) else int(value or 0)

    n_head = most("attention.head_count")
    n_embd = most("embedding_length")
    tokens = kv.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []

    def token_text(key: str) -> str:
        i = kv.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    n_layer, n_expert = int(a("block_count")), int(a("expert_count", 0) or 0)
    routing = routing_table(kv, n_layer, n_expert)
    tokens_seen = kv.get(ROUTING_TOKENS)
    return ModelInfo(
        path=str(mf.path),
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=most("attention.head_count_kv", n_head),
        head_dim=int(a("attention.key_length", 0) or (n_embd // n_head if n_head else 0)),
        n_ff=most("feed_forward_length"),
        n_expert=n_expert,
        n_expert_used=int(a("expert_used_count", 0) or 0),
        n_ctx_train=int(a("context_length", 4096) or 4096),
        n_vocab=len(tokens) or int(a("vocab_size", 0) or 0),
        tensors=tuple(Tensor(e.name, e.nbytes, layer_of(e.name), role(e.name), e.type.name, e.n_elements, e.part)
                      for e in mf.tensors),
        name=shown(kv.get("general.name") or mf.name),
        file_type=_file_type_name(kv.get("general.file_type")),
        prompt=PromptFormat(
            template=kv.get("tokenizer.chat_template"),
            bos=token_text("tokenizer.ggml.bos_token_id"),
            eos=token_text("tokenizer.ggml.eos_token_id"),
            add_bos=bool(kv.get("tokenizer.ggml.add_bos_token", kv.get("tokenizer.ggml.model") == "llama")),
            native_tools=set(CONTROL) <= set(tokens),
        ),
        routing=routing,
        routing_tokens=tokens_seen if routing and isinstance(tokens_seen, int) and tokens_seen >= 0 else 0,
        target=target_of(kv),
    )


def read_model_info(path) -> ModelInfo:
    return model_info(open_model_file(path))


def _file_type_name(ftype) -> str:
    if ftype is None:
        return ""
    import gguf

    try:
        return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
    except (ValueError, TypeError):
        return str(ftype)
