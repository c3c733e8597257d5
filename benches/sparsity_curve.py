#!/usr/bin/env python3
"""Latency (and accuracy) of weight sparsity over a range of fractions, as a table and a plot.

For each build (int8 and fp32, each at every fraction of --fractions, `--sparsity-pattern`
block:64x32 by default) builds MODEL.onnx with `tcc build --sparsity F`, then times it against
the dense build of the same kind with `tcc bench --against` (a run of each in turn: the speed-up
is the median of the paired ratios, which a shared machine's slow and fast minutes leave alone)
and, with --ort, onnxruntime running ORT.onnx (its dense dynamic int8 model, say) right after,
for the ratio to it. With --calibration, --tokenizer and --eval the builds are calibrated and
the report's cosine against the f32 build is read from each build.

usage: benches/sparsity_curve.py MODEL.onnx [--ort ORT.onnx] [--fractions 0,0.5,0.8,0.9,0.95]
          [--pattern block:64x32] [--kinds int8,fp32] [--calibration C --tokenizer T --eval E]
          [--rounds 3] [--runs 40] [--threads 2] [--tcc target/release/tcc] [--json out.json]
          [--plot curve.png]

Needs numpy and onnxruntime with --ort (the test fixtures' venv has both), matplotlib with --plot.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build(a, out, kind, fraction):
    cmd = [a.tcc, "build", a.model, "-o", out, "--report-json", out + ".json"]
    if kind == "int8":
        cmd += ["--quantize", "int8"]
    if fraction > 0:
        cmd += ["--sparsity", str(fraction), "--sparsity-pattern", a.pattern]
    if a.tokenizer:
        cmd += ["--tokenizer", a.tokenizer]
    if a.calibration and fraction > 0:
        cmd += ["--calibration", a.calibration]
    if a.eval and (fraction > 0 or kind == "int8"):
        cmd += ["--eval", a.eval]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = json.load(open(out + ".json"))
    acc = (report.get("accuracy") or {}).get("outputs") or [{}]
    return acc[0].get("mean_cosine")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ort", help="an ONNX model for onnxruntime to time beside each build")
    ap.add_argument("--fractions", default="0,0.5,0.8,0.9,0.95")
    ap.add_argument("--pattern", default="block:64x32")
    ap.add_argument("--kinds", default="int8,fp32")
    ap.add_argument("--calibration")
    ap.add_argument("--tokenizer")
    ap.add_argument("--eval")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tcc", default="target/release/tcc")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="write latency against sparsity to this PNG (needs matplotlib)")
    a = ap.parse_args()
    if a.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the long builds)
        except ImportError:
            ap.error("--plot needs matplotlib: pip install matplotlib")
    fractions = [float(f) for f in a.fractions.split(",")]
    if 0.0 not in fractions:
        fractions = [0.0] + fractions
    sess = feeds = None
    if a.ort:
        from compare import ort_feeds, ort_session, time_ort
        sess = ort_session(a.ort, a.threads)
        feeds = ort_feeds(sess, 1, 128)
    work = tempfile.mkdtemp(prefix="sparsity-curve-")
    rows = []
    for kind in a.kinds.split(","):
        for f in fractions:
            art = os.path.join(work, f"{kind}-{f}.tcc")
            cos = build(a, art, kind, f)
            rows.append({"kind": kind, "sparsity": f, "artifact": art, "mean_cosine": cos, "ratios": [], "ms": [],
                         "ort_ms": []})
            print(f"built {kind} {f}", flush=True)
    for _ in range(a.rounds):
        for r in rows:
            dense = next(x for x in rows if x["kind"] == r["kind"] and x["sparsity"] == 0.0)
            out = subprocess.run([a.tcc, "bench", r["artifact"], "--against", dense["artifact"], "--json", "--runs",
                                  str(a.runs), "--threads", str(a.threads)], check=True, capture_output=True,
                                 text=True).stdout
            v = json.loads(out)
            r["ratios"].append(v["speedup"])
            r["ms"].append(v["median_ms"])
            if sess is not None:
                r["ort_ms"].append(statistics.median(time_ort(sess, feeds, a.runs)))
    print(f"\nbatch 1, sequence 128, {a.threads} threads, pattern {a.pattern}, {a.rounds} rounds of {a.runs} runs of "
          f"each build in turn with the dense one of its kind (speed-up: median of the paired ratios)"
          + (f"; onnxruntime on {os.path.basename(a.ort)} right after each" if a.ort else ""))
    print(f"{'build':6} {'sparsity':>8} {'ms':>8} {'speed-up':>9}" + (f" {'ort ms':>8} {'tcc/ort':>8}" if a.ort else "")
          + ("  mean cos" if a.eval else ""))
    for r in rows:
        r["median_ms"] = statistics.median(r["ms"])
        r["speedup"] = statistics.median(r["ratios"])
        line = f"{r['kind']:6} {r['sparsity']:8.2f} {r['median_ms']:8.2f} {r['speedup']:8.3f}x"
        if a.ort:
            r["ort_median_ms"] = statistics.median(r["ort_ms"])
            r["tcc_over_ort"] = statistics.median(t / o for t, o in zip(r["ms"], r["ort_ms"]))
            line += f" {r['ort_median_ms']:8.2f} {r['tcc_over_ort']:8.3f}"
        if a.eval:
            line += f"  {r['mean_cosine']:.4f}" if r["mean_cosine"] is not None else "  -"
        print(line)
    if a.plot:
        plot(rows, a)
    if a.json:
        json.dump([{k: v for k, v in r.items() if k != "artifact"} for r in rows], open(a.json, "w"), indent=1)


def cpu():
    """The CPU's name and whether it has AMX (which the int8 and bf16 kernels use): curves
    from different machines differ most by that."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "unknown CPU")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    kind = "AMX" if "amx_int8" in flags else "AVX-512 VNNI, no AMX" if "avx512_vnni" in flags else "no AVX-512 VNNI"
    return f"{name} ({kind})"


def plot(rows, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("int8", "o"), ("fp32", "s")):
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.plot([100 * r["sparsity"] for r in pts], [r["speedup"] for r in pts], marker=marker,
                    label=f"tcc {kind}, against tcc dense {kind}")
    xs = [x / 2 for x in range(0, 191)]
    ax.plot(xs, [1 / (1 - x / 100) for x in xs], linestyle=":", color="gray", label="ideal (1 / density)")
    ax.set_ylim(0, max(4.0, max(r["speedup"] for r in rows) * 1.2))
    ax.set_xlabel(f"weights zero, % ({a.pattern})")
    ax.set_ylabel(f"speed-up (batch 1, sequence 128, {a.threads} threads)")
    ax.set_title(f"weight sparsity: {os.path.basename(a.model)}\n{cpu()}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
