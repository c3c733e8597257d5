#!/usr/bin/env python3
"""tcc against onnxruntime, in the same run, on the same ONNX models.

For each model: builds the tcc artifact, then alternates rounds of onnxruntime and `tcc bench`
(same batch, sequence length and thread count, random valid token ids), and reports each one's
median latency over all rounds and the ratio tcc / onnxruntime. Alternating rounds spreads the
noise of a shared machine over both.

usage: benches/compare.py MODEL.onnx [MODEL.onnx ...] [--batch 1] [--seq 128] [--threads 2]
                          [--rounds 5] [--runs 20] [--tcc target/release/tcc] [--json out.json]
                          [--build-args "--quantize int8"]

A model given as ORT.onnx,TCC.onnx runs ORT.onnx in onnxruntime and builds TCC.onnx with tcc
(`tcc build TCC.onnx --build-args...`): how tcc's own int8 quantization of the f32 model is
compared with onnxruntime running its dynamic int8 model,
e.g. `minilm_l6_dynint8.onnx,minilm_l6.onnx --build-args "--quantize int8"`.
Needs numpy and onnxruntime (the test fixtures' venv has both).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def ort_session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_feeds(sess, batch, seq):
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        n = i.name.lower()
        dtype = np.int64 if "int64" in i.type else np.int32
        if "mask" in n:
            v = np.ones((batch, seq), dtype)
        elif "token_type" in n or "segment" in n:
            v = np.zeros((batch, seq), dtype)
        else:
            v = rng.integers(1000, 2000, (batch, seq)).astype(dtype)
        feeds[i.name] = v
    return feeds


def time_ort(sess, feeds, runs):
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


ORT_MEMORY = """
import resource, sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[2])
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
feeds = {}
for i in s.get_inputs():
    dt = np.int64 if "int64" in i.type else np.int32
    n = i.name.lower()
    v = np.ones if "mask" in n else np.zeros
    feeds[i.name] = v((int(sys.argv[3]), int(sys.argv[4])), dt)
for _ in range(5): s.run(None, feeds)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def ort_peak_rss(path, args):
    """Peak resident memory of a fresh process that loads the model in onnxruntime and runs it."""
    out = subprocess.run([sys.executable, "-c", ORT_MEMORY, path, str(args.threads), str(args.batch), str(args.seq)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def time_tcc(tcc, artifact, args, runs):
    out = subprocess.run([tcc, "bench", artifact, "--batch", str(args.batch), "--seq", str(args.seq),
                          "--threads", str(args.threads), "--runs", str(runs), "--warmup", "3", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tcc", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "tcc"))
    ap.add_argument("--json")
    ap.add_argument("--build-args", default="", help="extra arguments of `tcc build`")
    args = ap.parse_args()
    results = []
    tmp = tempfile.mkdtemp(prefix="tcc-compare-")
    print(f"batch {args.batch}, sequence {args.seq}, {args.threads} threads, {args.rounds} alternating rounds of {args.runs} runs")
    print(f"{'model':52} {'onnxruntime ms':>15} {'tcc ms':>10} {'tcc/ort':>8} {'ort RSS MB':>11} {'tcc RSS MB':>11} {'tcc load+JIT ms':>16}")
    for spec in args.models:
        path, source = (spec.split(",", 1) + [spec])[:2]
        name = os.path.splitext(os.path.basename(path))[0]
        if source != path:
            name += " / tcc " + os.path.splitext(os.path.basename(source))[0]
        artifact = os.path.join(tmp, f"model{len(results)}.tcc")
        subprocess.run([args.tcc, "build", source, "-o", artifact] + args.build_args.split(), check=True,
                       capture_output=True)
        sess = ort_session(path, args.threads)
        feeds = ort_feeds(sess, args.batch, args.seq)
        time_ort(sess, feeds, 5)
        ort_ms, tcc_ms, info = [], [], {}
        for _ in range(args.rounds):
            ort_ms += time_ort(sess, feeds, args.runs)
            info = time_tcc(args.tcc, artifact, args, args.runs)
            tcc_ms.append(info["median_ms"])
        o, t = statistics.median(ort_ms), statistics.median(tcc_ms)
        ort_rss = ort_peak_rss(path, args)
        results.append({"model": name, "ort_median_ms": o, "tcc_median_ms": t, "ratio": t / o,
                        "ort_peak_rss_bytes": ort_rss, "tcc_peak_rss_bytes": info.get("peak_rss_bytes"),
                        "tcc_load_ms": info.get("load_ms"), "tcc_jit_ms": info.get("jit_ms"), "tier": info.get("tier")})
        print(f"{name:52} {o:15.2f} {t:10.2f} {t / o:8.3f} {ort_rss / 1e6:11.1f} {info.get('peak_rss_bytes', 0) / 1e6:11.1f}"
              f" {info.get('load_ms', 0):16.1f}", flush=True)
    if args.json:
        json.dump({"batch": args.batch, "seq": args.seq, "threads": args.threads, "results": results}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
