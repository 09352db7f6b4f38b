"""Quality per byte: every quantization type, plain and calibrated, measured by KL-divergence against the
BF16 reference, side by side with llama.cpp's own calibrated route, in one run.

    .venv/bin/python benchmarks/quality.py [--fixture upcycled|tiny] [--types Q4_K_M,IQ3_XXS,...]
        [--calibration-tokens 20000] [--chunks 20] [--ctx 512] [--llama-route Q4_K_M,...] [--work DIR]

For the fixture (tests/support/checkpoints.py: the upcycled SmolLM2 MoE, or the tiny random Mixtral):
  reference  localmix quantize SRC --type BF16
  plain      localmix quantize SRC --type T                              (types that need an imatrix: refused)
  auto       localmix quantize SRC --type Q4_K_M --imatrix auto           (once: the calibration's time and memory;
             --calibration-text the built-in text, --calibration-tokens N) it saves the imatrix it computed...
  imatrix    localmix quantize SRC --type T --imatrix THAT.imatrix.gguf  (...which every other type reuses: same bytes)
  llama.cpp  llama-imatrix on the BF16 GGUF with the same text and chunks, then llama-quantize --imatrix (the
             tools built from the vendored llama.cpp by tests/support/llama_tools.py), for --llama-route types
and each output is scored with `localmix eval OUT --reference BF16 --chunks N --ctx C --json` on the built-in
evaluation text (held out from calibration). Every step runs in its own process: wall time and peak RSS
(VmHWM) of that process. Prints a markdown table; --json-out FILE keeps every number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ALL_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S",
             "IQ3_M", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_M"]

# One localmix command in a fresh interpreter; its time and peak memory as JSON on the last line of stderr.
STEP = r"""
import json, sys, time
t0 = time.perf_counter()
from localmix.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
sys.stdout.flush()
print("\n" + json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss": hwm}), file=sys.stderr)
"""


def localmix(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", STEP, *args], capture_output=True, text=True, cwd=ROOT)
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    stats["stdout"], stats["stderr"] = r.stdout, r.stderr
    return stats


def timed(path: Path, *args: str) -> dict:
    """A llama.cpp tool, timed."""
    t0 = time.perf_counter()
    r = subprocess.run([str(path), *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{path.name} failed: {r.stderr[-2000:]}")
    return {"seconds": time.perf_counter() - t0}


def evaluate(model: Path, ref: Path, text: Path, chunks: int, ctx: int) -> dict:
    r = localmix("eval", str(model), "--reference", str(ref), "--text", str(text), "--chunks", str(chunks),
                 "--ctx", str(ctx), "--json")
    if r["rc"]:
        raise SystemExit(f"eval of {model.name} failed: {r['stderr'][-2000:]}")
    d = json.loads(r["stdout"])
    d["eval_seconds"] = r["seconds"]
    return d


def quantize(src: Path, out: Path, qtype: str, *extra: str) -> dict:
    r = localmix("quantize", str(src), "-o", str(out), "--type", qtype, "--force", *extra)
    if r["rc"] == 0:
        r["bytes"] = out.stat().st_size
    else:
        r["error"] = r["stderr"].strip().splitlines()[0] if r["stderr"].strip() else "?"
    return r


def build(fixture: str, work: Path) -> Path:
    from tests.support.checkpoints import make_tiny_mixtral, make_upcycled_smollm

    src = work / fixture
    if not (src / "config.json").exists():
        (make_upcycled_smollm if fixture == "upcycled" else make_tiny_mixtral)(src)
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", choices=["upcycled", "tiny"], default="upcycled")
    ap.add_argument("--types", default=",".join(ALL_TYPES))
    ap.add_argument("--llama-route", default="Q4_K_M,IQ4_XS,Q3_K_M,IQ3_XXS,Q2_K", help="types also made llama.cpp's way")
    ap.add_argument("--calibration-tokens", type=int, default=20000)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/localmix-quality"))
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    types = [t for t in args.types.split(",") if t]
    llama_types = [t for t in args.llama_route.split(",") if t]

    from quantize.texts import calibration_text, eval_text

    work = args.work / args.fixture
    work.mkdir(parents=True, exist_ok=True)
    src = build(args.fixture, args.work)
    cal, held_out = work / "calibration.txt", work / "eval.txt"
    cal.write_text(calibration_text(), encoding="utf-8")
    held_out.write_text(eval_text(), encoding="utf-8")
    results: dict = {"fixture": args.fixture, "calibration_tokens": args.calibration_tokens, "chunks": args.chunks,
                     "ctx": args.ctx, "rows": {}}

    ref = work / "ref-BF16.gguf"
    results["reference"] = quantize(src, ref, "BF16")
    print(f"reference: {ref.stat().st_size / 2**20:.0f} MiB in {results['reference']['seconds']:.1f} s", file=sys.stderr)
    self_eval = evaluate(ref, ref, held_out, args.chunks, args.ctx)  # builds the reference cache once
    results["reference_eval"] = self_eval

    # Calibration once, the localmix way: its cost on top of the plain Q4_K_M pass.
    auto_out = work / "auto-Q4_K_M.gguf"
    auto = quantize(src, auto_out, "Q4_K_M", "--imatrix", "auto", "--calibration-text", str(cal),
                    "--calibration-tokens", str(args.calibration_tokens))
    if auto["rc"]:
        raise SystemExit(f"--imatrix auto failed: {auto['stderr'][-2000:]}")
    imatrix = auto_out.with_suffix(".imatrix.gguf")
    results["auto"] = {k: auto[k] for k in ("seconds", "peak_rss", "bytes")}
    results["auto"]["eval"] = evaluate(auto_out, ref, held_out, args.chunks, args.ctx)

    # llama.cpp's route: llama-imatrix on the BF16 file with the same text and chunks, then llama-quantize.
    llama_imatrix = None
    if llama_types:
        from tests.support.llama_tools import tool as llama_tool

        llama_imatrix = work / "llama.imatrix.gguf"
        n_chunks = args.calibration_tokens // 512
        results["llama_imatrix"] = timed(llama_tool("llama-imatrix"), "-m", str(ref), "-f", str(cal), "-c", "512",
                                        "--chunks", str(n_chunks), "-o", str(llama_imatrix), "-t", "2")

    for qtype in types:
        row: dict = {}
        plain_out = work / f"plain-{qtype}.gguf"
        row["plain"] = quantize(src, plain_out, qtype)
        if row["plain"]["rc"] == 0:
            row["plain"]["eval"] = evaluate(plain_out, ref, held_out, args.chunks, args.ctx)
        cal_out = work / f"imatrix-{qtype}.gguf"
        row["imatrix"] = quantize(src, cal_out, qtype, "--imatrix", str(imatrix))
        if row["imatrix"]["rc"]:
            raise SystemExit(f"{qtype} with an imatrix failed: {row['imatrix']['stderr'][-2000:]}")
        row["imatrix"]["eval"] = evaluate(cal_out, ref, held_out, args.chunks, args.ctx)
        if qtype in llama_types and llama_imatrix is not None:
            from tests.support.llama_tools import tool as llama_tool

            ll_out = work / f"llama-{qtype}.gguf"
            row["llama"] = timed(llama_tool("llama-quantize"), "--imatrix", str(llama_imatrix), str(ref), str(ll_out), qtype, "2")
            row["llama"]["bytes"] = ll_out.stat().st_size
            row["llama"]["eval"] = evaluate(ll_out, ref, held_out, args.chunks, args.ctx)
        results["rows"][qtype] = row
        print(line(qtype, row, results), file=sys.stderr)
        for p in (plain_out, cal_out, work / f"llama-{qtype}.gguf"):
            p.unlink(missing_ok=True)

    print(table(results))
    if args.json_out:
        for row in results["rows"].values():
            for v in row.values():
                v.pop("stdout", None), v.pop("stderr", None)
        args.json_out.write_text(json.dumps(results, indent=1, default=str))


def _kld(r: dict | None) -> str:
    if not r or r.get("rc", 0) or "eval" not in r:
        return "refused" if r and r.get("rc") else "-"
    e = r["eval"]
    return f"{e['kld']['mean']:.4f} / {e['kld']['p99']:.3f} / {e['same_top1']:.1%}"


def line(qtype: str, row: dict, results: dict) -> str:
    return f"{qtype}: plain {_kld(row.get('plain'))}, imatrix {_kld(row.get('imatrix'))}, llama.cpp {_kld(row.get('llama'))}"


def table(results: dict) -> str:
    n_params = results["reference_eval"].get("model", {}).get("parameters") or 1
    out = ["| type | size | bpw | plain: mean KLD / p99 / same top-1 | PPL | with imatrix (localmix) | PPL | "
           "llama.cpp's route | mean KLD: imatrix vs plain | localmix vs llama.cpp |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for qtype, row in results["rows"].items():
        im = row["imatrix"]
        size = im["bytes"]
        plain_ppl = f"{row['plain']['eval']['ppl']['model']:.3f}" if row["plain"].get("eval") else "-"
        gain = (f"{im['eval']['kld']['mean'] / row['plain']['eval']['kld']['mean'] - 1:+.0%}" if row["plain"].get("eval") else "-")
        vs = (f"{im['eval']['kld']['mean'] / row['llama']['eval']['kld']['mean'] - 1:+.1%}" if row.get("llama") else "-")
        out.append(f"| {qtype} | {size / 2**20:.0f} MiB | {size * 8 / n_params:.2f} | {_kld(row['plain'])} | {plain_ppl} | "
                   f"{_kld(im)} | {im['eval']['ppl']['model']:.3f} | {_kld(row.get('llama'))} | {gain} | {vs} |")
    ref = results["reference_eval"]["ppl"]["reference"]
    out.append(f"\nReference (BF16) PPL {ref:.3f}. Calibration: --imatrix auto (Q4_K_M) {results['auto']['seconds']:.1f} s, "
               f"peak {results['auto']['peak_rss'] / 2**20:.0f} MiB; plain Q4_K_M pass "
               f"{results['rows'].get('Q4_K_M', {}).get('plain', {}).get('seconds', float('nan')):.1f} s.")
    if "llama_imatrix" in results:
        out.append(f"llama-imatrix on the BF16 GGUF: {results['llama_imatrix']['seconds']:.1f} s "
                   f"(plus the BF16 conversion, {results['reference']['seconds']:.1f} s).")
    return "\n".join(out)


if __name__ == "__main__":
    main()
