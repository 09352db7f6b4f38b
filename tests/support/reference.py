"""transformers' forward pass in float32: the reference that converted files are checked against."""

from __future__ import annotations

MIXED_TEXT = (
    "The capital of France is Paris, and the Eiffel Tower stands on the Champ de Mars. "
    "Le cœur a ses raisons que la raison ne connaît point; déjà l'été s'achève à Montréal. "
    "Die Straße nach München ist über hundert Kilometer lang, größer als gedacht. "
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])\n"
)


def hf_logits(architecture: str, folder, tokens: list[int]):
    import torch
    import transformers

    model = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()
