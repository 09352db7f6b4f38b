"""The checkpoint fuzz suite: seeded mutations of the tiny Mixtral (tests/fuzz/checkpoints.py) through
`localmix quantize`, each in a forked child with a time limit. Every case either succeeds, with a GGUF
that opens, or fails with exit status 1 and one line; no traceback, hang or signal, and nothing left
behind but the output of a success. A longer sweep runs the same generator with a bigger n."""

from __future__ import annotations

from pathlib import Path

from localmix.hardware import detect
from localmix.modelfile import open_model_file
from tests.fuzz.checkpoints import OUT, cases
from tests.fuzz.harness import Harness, failures

SEED, N = 10, 120


def test_hostile_checkpoints(tiny, tmp_path):
    detect()  # a success ends with a plan summary: its bandwidth probes run once here, then are cached
    with Harness(workers=2) as h:  # LOCALMIX_HOME and HF_HOME: the test's own (conftest)
        outcomes = h.run(cases(SEED, N, tmp_path / "cases", base=tiny))
    assert all(o.ok for o in outcomes), failures(outcomes)
    left = [f"[{o.case.label}] {p}" for o in outcomes for p in o.new_files if not (o.code == 0 and p == OUT)]
    assert not left, left
    done = [o for o in outcomes if o.code == 0]
    for o in done:
        open_model_file(Path(o.case.cwd) / OUT)
    # Both ways out are exercised: a generator that only makes refused inputs would test little.
    assert len(done) >= N // 10 and len(outcomes) - len(done) >= N // 2, [o.case.label for o in done]
