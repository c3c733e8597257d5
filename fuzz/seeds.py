"""Seed corpora for tcc's fuzz targets, made from real exports (run by fuzz/run.sh with the
test fixtures' Python, which has onnx, numpy and onnxruntime).

A fuzzer mutating a 17 MB model spends its time in weight bytes, so the ONNX seeds are the
fixtures' real torch.onnx export of a 2-layer BERT (`bert_tiny_pooler.onnx`) with its sizes
shrunk (hidden 128 -> 8, intermediate and positions 512 -> 16, vocabulary 30522 -> 64, head
size 64 -> 4: the same graph, a few KB), checked to run in onnxruntime; plus what onnxruntime's
own tools make of it (the fused graph of its transformer optimizer, dynamic int8). The
artifact seeds are tcc's builds of those (made by run.sh); the input seeds are `tcc run`'s
formats (JSON, .npy, .npz).

usage: seeds.py FIXTURES_DIR OUT_DIR
"""
import io
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

SIZES = {128: 8, 512: 16, 30522: 64}


def shrink(src, dst):
    m = onnx.load(src)
    rng = np.random.default_rng(0)
    for i, t in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(t)
        shape = [SIZES.get(d, d) for d in a.shape]
        if a.dtype == np.float32:
            a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    for n in m.graph.node:
        if n.op_type != "Constant":
            continue
        for at in n.attribute:
            if at.name != "value":
                continue
            a = numpy_helper.to_array(at.t)
            if a.dtype != np.int64:
                continue
            if 512 in a.shape:  # position ids 0..511
                a = np.arange(16, dtype=np.int64).reshape([SIZES.get(d, d) for d in a.shape])
            else:
                a = np.where(a == 64, 4, a).astype(np.int64)  # the head size in reshapes
            at.t.CopyFrom(numpy_helper.from_array(a, at.t.name))
    for v in list(m.graph.output) + list(m.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                d.dim_value = SIZES.get(d.dim_value, d.dim_value)
    onnx.save(m, dst)
    # The shrunk model must still be a model: onnxruntime runs it.
    s = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    feed = {}
    for i in s.get_inputs():
        feed[i.name] = np.ones((1, 5), dtype=np.int64) if i.name != "token_type_ids" else np.zeros((1, 5), np.int64)
    s.run(None, feed)


def sparse_linear(dst):
    """One product by 128 x 128 weights whose last 96 rows are zero, as `tcc build --sparsity`
    leaves them: tcc stores such weights without their zero chunks (artifact format 2), which
    the shrunk BERT's weights are too small for, so the artifact seeds reach that reader too."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 128)).astype(np.float32)
    w[32:] = 0.0
    b = rng.standard_normal(128).astype(np.float32)
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "sparse_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 128])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    onnx.save(m, dst)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    s = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    assert np.allclose(s.run(None, {"x": x})[0], x @ w + b, atol=1e-4)


def main():
    fixtures, out = sys.argv[1], sys.argv[2]
    onnx_dir = os.path.join(out, "onnx_import")
    inputs_dir = os.path.join(out, "run_inputs")
    os.makedirs(onnx_dir, exist_ok=True)
    os.makedirs(inputs_dir, exist_ok=True)
    micro = os.path.join(onnx_dir, "bert_micro.onnx")
    shrink(os.path.join(fixtures, "models", "bert_tiny_pooler.onnx"), micro)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(micro, model_type="bert", num_heads=2, hidden_size=8, opt_level=0)
    fused.save_model_to_file(os.path.join(onnx_dir, "bert_micro_ortfused.onnx"))
    quantize_dynamic(micro, os.path.join(onnx_dir, "bert_micro_dynint8.onnx"), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

    sparse_linear(os.path.join(onnx_dir, "sparse_linear.onnx"))

    ids = np.array([[2, 7, 9, 3]], dtype=np.int64)
    with open(os.path.join(inputs_dir, "inputs.json"), "w") as f:
        json.dump({"input_ids": ids.tolist(), "attention_mask": [[1, 1, 1, 0]], "f": [[0.5, -1.0]]}, f)
    buf = io.BytesIO()
    np.save(buf, ids)
    open(os.path.join(inputs_dir, "input_ids.npy"), "wb").write(buf.getvalue())
    np.savez(os.path.join(inputs_dir, "inputs.npz"), input_ids=ids, attention_mask=np.ones_like(ids),
             f=np.zeros((2, 3), np.float32))
    print("seeds in", out, ":", sorted(os.listdir(onnx_dir)), sorted(os.listdir(inputs_dir)))


if __name__ == "__main__":
    main()
