"""The one-time fit of quantize.sensitivity.ROLE_WEIGHTS against `localmix eval`.

    nice .venv/bin/python benchmarks/fit_role_weights.py [--chunks 10] [--work /tmp/localmix-mixed]
        [--quality-work /tmp/localmix-quality] [--json-out FILE]

The error model of `--bpw` and `--for` is additive: mean KLD ~ sum over units (tensors; a layer's stacked
experts are one) of ROLE_WEIGHTS[role] x nsr(unit, type), where nsr is the importance-weighted noise-to-signal
ratio quantize.sensitivity.measure computes on the real weights. One weight per role turns nsr into KLD.

On the upcycled SmolLM2 fixture with its `--imatrix auto` imatrix (benchmarks/quality.py's files), every file
made with that imatrix by quantize.convert.convert(types=...):
  base       every unit Q8_0
  role r, t  every unit Q8_0 except role r's units (all layers) at type t: the lowest type llama.cpp accepts
             for the row length (Q2_K for 256-divisible rows, Q4_0 for the 576-wide rows a 256-block does not
             divide) and, for the expert matrices and the embedding/output, one more (Q4_K, Q5_0)
each scored by `localmix eval FILE --reference BF16 --chunks N`. A point is (dN, dK): dN = sum over role r's
units of nsr(t) - nsr(Q8_0), dK = its mean KLD minus the base file's. The weight is the least-squares slope
through the origin over the role's points, sum(dN dK) / sum(dN^2). The fixture ties its embeddings, so its
token_embd is the output matrix too and sensitivity gives it the role `output`: that is the role fitted.
Roles this fixture lacks take the weight of their nearest kin: a dense FFN matrix that of the same expert
matrix (a token sees k experts' outputs, each as noisy as one dense matrix of the same nsr). The input
embedding of an untied model (`token_embd`) cannot be isolated here and keeps sensitivity.py's value.

Check: the fitted model's prediction for uniform Q3_K_M, Q4_K_M and Q5_K_M (same imatrix) against their
measured mean KLD (the base file's measured KLD is the floor both include).

Prints the dict to paste into quantize/sensitivity.py and the tables. 16 files: 23 minutes on the shared
2-core machine with --chunks 10 (the eval results are kept in WORK/scores/, so a rerun only refits: 15 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.mixed_precision import Work, say  # noqa: E402

CHECK = ["Q3_K_M", "Q4_K_M", "Q5_K_M"]
POINTS = {256: ("Q2_K", "Q4_K"), 32: ("Q4_0", "Q5_0")}  # by the largest block that divides the rows
TWO_POINTS = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "token_embd", "output"}
# Roles absent from the fixture, and the fitted role whose weight they take (see the docstring). The input
# embedding of an untied model (token_embd) has no kin here: it keeps sensitivity.py's value, an assumption.
KIN = {"ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps"}


def unit_tensors(work: Work) -> dict[str, list]:
    """The fixture's quantizable tensors (the units), by role."""
    from quantize.sensitivity import is_unit, role_of

    tensors = work.planned("Q8_0")
    tied = not any(t.name == "output.weight" for t in tensors)  # then token_embd is the output matrix: role "output"
    out: dict[str, list] = {}
    for t in tensors:
        if is_unit(t):
            out.setdefault(role_of(t.name, tied), []).append(t)
    return out


def points_for(role: str, ne0: int) -> tuple[str, ...]:
    """Two types for the roles that hold most of the weights (the second point shows how linear KLD is in
    nsr there), the lowest alone for the attention matrices (a 2-core machine's time)."""
    pts = POINTS[256] if ne0 % 256 == 0 else POINTS[32]
    return pts if role in TWO_POINTS else pts[:1]


def measure_files(work: Work) -> dict:
    from gguf import GGMLQuantizationType as T

    roles = unit_tensors(work)
    base = {t.name: T.Q8_0 for ts in roles.values() for t in ts}
    out = {"base": work.made("fit-base-Q8_0", "Q8_0", base), "roles": {}, "uniform": {}}
    for role, ts in roles.items():
        ne0 = {t.ne0 for t in ts}
        assert len(ne0) == 1, (role, ne0)
        for tname in points_for(role, ne0.pop()):
            say(f"{role} at {tname}")
            types = base | {t.name: T[tname] for t in ts}
            out["roles"].setdefault(role, {})[tname] = work.made(f"fit-{role}-{tname}", "Q8_0", types)
    for u in CHECK:
        say(f"uniform {u}")
        out["uniform"][u] = work.made(f"uniform-{u}", u)
    return out


def measured_units(work: Work) -> list:
    """quantize.sensitivity.measure on the fixture with the imatrix, as `quantize --imatrix FILE` calls it."""
    from localmix.commands.quantize import imatrix_routing
    from quantize import sensitivity
    from quantize.convert import planned

    im = work.importance()
    t0 = time.perf_counter()
    with planned(work.src, "Q8_0", has_imatrix=True) as (_, hp, tensors):  # measure reads the weights: files open
        units = sensitivity.measure(tensors, im, routing=imatrix_routing(im, hp))
    say(f"sensitivity.measure: {len(units)} units in {time.perf_counter() - t0:.1f} s")
    return units


def nsr(unit, t) -> float:
    """The unit's nsr at type t: its option's error over the role weight in force when it was measured."""
    from quantize.sensitivity import ROLE_WEIGHTS

    return unit.option(t).error / ROLE_WEIGHTS[unit.role]


def fit(files: dict, units: list) -> tuple[dict, list]:
    from gguf import GGMLQuantizationType as T

    by_role: dict[str, list] = {}
    for u in units:
        by_role.setdefault(u.role, []).append(u)
    base = files["base"]["kld"]
    weights, rows = {}, []
    for role, pts in files["roles"].items():
        sxy = sxx = 0.0
        for tname, r in pts.items():
            dn = sum(nsr(u, T[tname]) - nsr(u, T.Q8_0) for u in by_role[role])
            dk = r["kld"] - base
            sxy, sxx = sxy + dn * dk, sxx + dn * dn
            rows.append({"role": role, "type": tname, "units": len(by_role[role]), "dN": dn, "dK": dk,
                         "kld": r["kld"], "point_weight": dk / dn if dn else float("nan")})
        weights[role] = max(sxy / sxx, 0.0) if sxx else 0.0
    from quantize.sensitivity import ROLE_WEIGHTS

    for role, kin in KIN.items():
        if role not in weights and kin in weights:
            weights[role] = weights[kin]
    for role, w in ROLE_WEIGHTS.items():
        weights.setdefault(role, w)  # not fitted on this fixture (printed as such)
    return weights, rows


def predict(units: list, types: dict, weights: dict) -> float:
    return sum(weights[u.role] * nsr(u, types[u.name]) for u in units)


def check_uniform(work: Work, files: dict, units: list, weights: dict) -> list:
    from gguf import GGMLQuantizationType as T

    base_types = {u.name: T.Q8_0 for u in units}
    base_model = predict(units, base_types, weights)
    out = []
    for u, r in files["uniform"].items():
        types = {t.name: t.type for t in work.planned(u)}
        p = predict(units, types, weights)
        # The model predicts differences; the base file's measured KLD anchors its level.
        anchored = files["base"]["kld"] + p - base_model
        out.append({"type": u, "measured": r["kld"], "model": p, "anchored": anchored})
    return out


def tables(files: dict, weights: dict, rows: list, checks: list) -> str:
    out = [f"All units Q8_0: mean KLD {files['base']['kld']:.4f} ({files['base']['bytes'] / 2**20:.0f} MiB).", "",
           "| role | units | type | mean KLD | dK (vs all Q8_0) | dN (sum of nsr over units) | dK / dN |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['role']} | {r['units']} | {r['type']} | {r['kld']:.4f} | {r['dK']:+.4f} | {r['dN']:.4g} | "
                   f"{r['point_weight']:.4g} |")
    out += ["", "| uniform (imatrix) | measured mean KLD | predicted (model + all-Q8_0 floor) | error |", "|---|---|---|---|"]
    for c in checks:
        out.append(f"| {c['type']} | {c['measured']:.4f} | {c['anchored']:.4f} | {c['anchored'] / c['measured'] - 1:+.0%} |")
    out += ["", "ROLE_WEIGHTS = {"]
    fitted = {r["role"] for r in rows} | {k for k, v in KIN.items() if v in weights}
    out += [f"    {k!r}: {v:.4g}," + ("" if k in fitted else "  # not fitted here: sensitivity.py's value")
            for k, v in sorted(weights.items())]
    out += ["}"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/localmix-mixed"))
    ap.add_argument("--quality-work", type=Path, default=Path("/tmp/localmix-quality"))
    ap.add_argument("--files-only", action="store_true", help="make and score the files, do not fit (no sensitivity needed)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--fixture", choices=["upcycled", "tiny"], default="upcycled",
                    help="tiny: quality.py's random Mixtral (untied: it has an input embedding and an output matrix)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    root = args.work if args.fixture == "upcycled" else args.work / args.fixture
    work = Work(root, args.quality_work, args.chunks, args.ctx, fixture=args.fixture).prepare()
    files = measure_files(work)
    say(f"files made and scored in {time.perf_counter() - t0:.0f} s")
    if args.files_only:
        print(json.dumps(files, indent=1))
        return
    units = measured_units(work)
    weights, rows = fit(files, units)
    checks = check_uniform(work, files, units, weights)
    print(tables(files, weights, rows, checks))
    say(f"total {time.perf_counter() - t0:.0f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps({"files": files, "weights": weights, "points": rows, "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
