#!/usr/bin/env python3
"""Accuracy and speed of structured pruning over a range of settings, as a table.

For each setting (a share of heads, of FFN neurons, a number of layers, or a mix) builds the
model with `tcc build --prune-... --calibration CALIB --eval EVAL`, reads the build report's
cosine against the unpruned build, then times every artifact against the unpruned one with
`tcc bench --against` (a run of each in turn: the speed-up is the median of the paired ratios,
so that a shared machine's slow and fast minutes weigh on both alike), over a few rounds.

usage: benches/prune_curve.py MODEL.onnx --tokenizer tokenizer.json --calibration calib.txt
                              --eval heldout.txt [--rounds 3] [--runs 60] [--seq 128]
                              [--threads 2] [--tcc target/release/tcc] [--json out.json]
                              [--plot curve.png]

--plot draws speed-up against mean cosine, one line per kind of pruning (needs matplotlib:
`pip install matplotlib`).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

SETTINGS = [
    ("unpruned", []),
    ("heads 12.5%", ["--prune-heads", "0.125"]),
    ("heads 25%", ["--prune-heads", "0.25"]),
    ("heads 37.5%", ["--prune-heads", "0.375"]),
    ("heads 50%", ["--prune-heads", "0.5"]),
    ("ffn 12.5%", ["--prune-ffn", "0.125"]),
    ("ffn 25%", ["--prune-ffn", "0.25"]),
    ("ffn 37.5%", ["--prune-ffn", "0.375"]),
    ("ffn 50%", ["--prune-ffn", "0.5"]),
    ("1 layer", ["--prune-layers", "1"]),
    ("2 layers", ["--prune-layers", "2"]),
    ("3 layers", ["--prune-layers", "3"]),
    ("heads 25% + ffn 25%", ["--prune-heads", "0.25", "--prune-ffn", "0.25"]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tcc", default="target/release/tcc")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="write the accuracy/speed curve to this PNG (needs matplotlib)")
    a = ap.parse_args()
    if a.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the long builds)
        except ImportError:
            ap.error("--plot needs matplotlib: pip install matplotlib")
    work = tempfile.mkdtemp(prefix="prune-curve-")
    rows = []
    for name, args in SETTINGS:
        art = os.path.join(work, f"{len(rows)}.tcc")
        rj = os.path.join(work, f"{len(rows)}.json")
        cmd = [a.tcc, "build", a.model, "-o", art, "--tokenizer", a.tokenizer, "--report-json", rj] + args
        if args:
            cmd += ["--calibration", a.calibration, "--eval", a.eval]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.load(open(rj))
        acc = (report.get("accuracy") or {}).get("outputs") or [{}]
        rows.append({"setting": name, "artifact": art, "mean_cosine": acc[0].get("mean_cosine", 1.0),
                     "min_cosine": acc[0].get("min_cosine", 1.0), "parameters": report["summary"]["parameters"],
                     "gflops": report["summary"].get("gflops_s128", 0.0),
                     "heads": report["summary"]["attention_heads"], "ms": []})
        print(f"built {name}", flush=True)
    # Each pruned build timed against the unpruned one in `tcc bench --against`: a run of each in
    # turn, the speed-up the median of the paired ratios (the machine is shared: its slow and
    # fast minutes weigh on both alike); the median of that over rounds through the settings.
    for _ in range(a.rounds):
        for r in rows[1:]:
            out = subprocess.run([a.tcc, "bench", r["artifact"], "--against", rows[0]["artifact"], "--json",
                                  "--runs", str(a.runs), "--seq", str(a.seq), "--threads", str(a.threads)],
                                 check=True, capture_output=True, text=True).stdout
            v = json.loads(out)
            r["ms"].append(v["median_ms"])
            r.setdefault("ratios", []).append(v["speedup"])
            rows[0]["ms"].append(v["against_median_ms"])
    print(f"\nbatch 1, sequence {a.seq}, {a.threads} threads, {a.rounds} rounds of {a.runs} runs of each build "
          f"in turn with the unpruned one (speed-up: median over rounds of the median paired ratio); "
          f"cosine of the sentence embedding against the unpruned build on {a.eval}")
    print(f"{'setting':24} {'mean cos':>9} {'worst cos':>9} {'params M':>9} {'GFLOPs':>7} {'ms':>8} {'speed-up':>9}"
          "  heads per layer")
    for r in rows:
        ms = statistics.median(r["ms"])
        r["median_ms"] = ms
        r["speedup"] = statistics.median(r.get("ratios", [1.0]))
        print(f"{r['setting']:24} {r['mean_cosine']:9.4f} {r['min_cosine']:9.4f} {r['parameters'] / 1e6:9.2f} "
              f"{r['gflops']:7.2f} {ms:8.2f} {r['speedup']:8.3f}x  {r['heads']}")
    if a.plot:
        plot(rows, a)
    if a.json:
        json.dump([{k: v for k, v in r.items() if k != "artifact"} for r in rows], open(a.json, "w"), indent=1)


def plot(rows, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("heads", "o"), ("ffn", "s"), ("layer", "^")):
        pts = [rows[0]] + [r for r in rows[1:] if kind in r["setting"] and "+" not in r["setting"]]
        ax.plot([r["speedup"] for r in pts], [r["mean_cosine"] for r in pts], marker=marker, label=kind)
        for r in pts[1:]:
            label = r["setting"].split(" ", 1)[1] if kind != "layer" else r["setting"]
            ax.annotate(label, (r["speedup"], r["mean_cosine"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
    for r in rows:
        if "+" in r["setting"]:
            ax.plot([r["speedup"]], [r["mean_cosine"]], marker="*", markersize=12, linestyle="", label=r["setting"])
    ax.set_xlabel(f"speed-up over the unpruned build (batch 1, sequence {a.seq}, {a.threads} threads)")
    ax.set_ylabel("mean cosine vs unpruned, held-out sentences")
    ax.set_title(f"structured pruning: {os.path.basename(a.model)}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
