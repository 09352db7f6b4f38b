"""Seeded, bounded fuzzing of localmix's inputs: generators of hostile files (`gguf.py`,
`checkpoints.py`, `templates.py`, ...) and `harness.py`, which runs many command lines fast and says
for each one how it ended (exit code, signal, hang, traceback, files left behind)."""
