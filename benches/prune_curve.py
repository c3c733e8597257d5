#!/usr/bin/env python3
"""Accuracy and speed of structured pruning over a range of settings, as a table.

For each setting (a share of heads, of FFN neurons, a number of layers, or a mix) builds the
model with `tcc build --prune-... --calibration CALIB --eval EVAL`, reads the build report's
cosine against the unpruned build, then times every artifact with `tcc bench` in alternating
rounds (the machine is shared: each setting's median over all rounds, and the speed-up over the
unpruned build in the same run).

usage: benches/prune_curve.py MODEL.onnx --tokenizer tokenizer.json --calibration calib.txt
                              --eval heldout.txt [--rounds 5] [--runs 20] [--seq 128]
                              [--threads 2] [--tcc target/release/tcc] [--json out.json]
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tcc", default="target/release/tcc")
    ap.add_argument("--json")
    a = ap.parse_args()
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
                     "heads": report["summary"]["attention_heads"], "ms": []})
        print(f"built {name}", flush=True)
    for _ in range(a.rounds):
        for r in rows:
            out = subprocess.run([a.tcc, "bench", r["artifact"], "--json", "--runs", str(a.runs), "--seq", str(a.seq),
                                  "--threads", str(a.threads)], check=True, capture_output=True, text=True).stdout
            r["ms"].append(json.loads(out)["median_ms"])
    base = statistics.median(rows[0]["ms"])
    print(f"\nbatch 1, sequence {a.seq}, {a.threads} threads, {a.rounds} alternating rounds of {a.runs} runs; "
          f"cosine of the sentence embedding against the unpruned build on {a.eval}")
    print(f"{'setting':24} {'mean cos':>9} {'worst cos':>9} {'params M':>9} {'ms':>8} {'speed-up':>9}  heads per layer")
    for r in rows:
        ms = statistics.median(r["ms"])
        r["median_ms"], r["speedup"] = ms, base / ms
        print(f"{r['setting']:24} {r['mean_cosine']:9.4f} {r['min_cosine']:9.4f} {r['parameters'] / 1e6:9.2f} "
              f"{ms:8.2f} {base / ms:8.3f}x  {r['heads']}")
    if a.json:
        json.dump([{k: v for k, v in r.items() if k != "artifact"} for r in rows], open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
