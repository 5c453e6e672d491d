"""A random-weight ONNX model with Wav2Lip-96's architecture and size, for GPU benchmarks.

Same layers as Wav2Lip's generator (face encoder of 7 blocks to 512x1x1, audio encoder to
512x1x1, decoder of transposed convolutions with skip connections from the face encoder,
sigmoid output), BatchNorm folded into the convolutions as an inference export has it, about 36
million parameters (145 MB as float32). The weights are random (He-initialised, scaled so the
activations stay bounded), so its output is noise: it measures speed and memory, not quality.

    python bench/wav2lip96.py OUT.onnx [--width 1.0] [--batch dynamic|N] [--float16]

`width` scales every channel count (0.125 gives a small model for tests).
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION, OPSET = 10, 17


class _Graph:
    def __init__(self, width: float, seed: int) -> None:
        self.nodes, self.inits, self.k = [], [], 0
        self.width = width
        self.rng = np.random.default_rng(seed)

    def ch(self, c: int) -> int:
        return max(1, int(round(c * self.width)))

    def name(self, prefix: str) -> str:
        self.k += 1
        return f"{prefix}{self.k}"

    def weight(self, shape, fan_in: int, gain: float) -> str:
        n = self.name("w")
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(shape) * gain * np.sqrt(2.0 / fan_in)).astype(np.float32), n))
        return n

    def bias(self, c: int) -> str:
        n = self.name("b")
        self.inits.append(numpy_helper.from_array(np.zeros(c, np.float32), n))
        return n

    def conv(self, x: str, cin: int, cout: int, k, s=1, p=1, residual: bool = False, act: bool = True,
             transpose: bool = False, output_padding: int = 0) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        sh, sw = (s, s) if isinstance(s, int) else s
        gain = 0.5 if residual else 1.0
        if transpose:
            w = self.weight((cin, cout, kh, kw), cin * kh * kw, gain)
            attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[p, p, p, p],
                         output_padding=[output_padding, output_padding])
            op = "ConvTranspose"
        else:
            w = self.weight((cout, cin, kh, kw), cin * kh * kw, gain)
            attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[p, p, p, p])
            op = "Conv"
        y = self.name("conv")
        self.nodes.append(helper.make_node(op, [x, w, self.bias(cout)], [y], **attrs))
        if residual:
            r = self.name("res")
            self.nodes.append(helper.make_node("Add", [y, x], [r]))
            y = r
        if act:
            a = self.name("relu")
            self.nodes.append(helper.make_node("Relu", [y], [a]))
            y = a
        return y

    def res(self, x: str, c: int, n: int) -> str:
        for _ in range(n):
            x = self.conv(x, c, c, 3, 1, 1, residual=True)
        return x


def build_wav2lip96(width: float = 1.0, batch: int | None = None, float16: bool = False,
                    seed: int = 0) -> onnx.ModelProto:
    """The model (inputs `audio_sequences` [B,1,80,16] and `face_sequences` [B,6,96,96], output
    [B,3,96,96], like the public exports); `batch` None: dynamic; `float16`: float16 weights,
    inputs and output."""
    g = _Graph(width, seed)
    C = g.ch
    # face encoder (96 -> 1), keeping each block's output for the decoder's skips
    x = "face_sequences"
    feats = []
    x = g.conv(x, 6, C(16), 7, 1, 3); feats.append((x, C(16)))
    x = g.conv(x, C(16), C(32), 3, 2, 1); x = g.res(x, C(32), 2); feats.append((x, C(32)))
    x = g.conv(x, C(32), C(64), 3, 2, 1); x = g.res(x, C(64), 3); feats.append((x, C(64)))
    x = g.conv(x, C(64), C(128), 3, 2, 1); x = g.res(x, C(128), 2); feats.append((x, C(128)))
    x = g.conv(x, C(128), C(256), 3, 2, 1); x = g.res(x, C(256), 2); feats.append((x, C(256)))
    x = g.conv(x, C(256), C(512), 3, 2, 1); x = g.res(x, C(512), 1); feats.append((x, C(512)))
    x = g.conv(x, C(512), C(512), 3, 1, 0); x = g.conv(x, C(512), C(512), 1, 1, 0); feats.append((x, C(512)))
    # audio encoder (80x16 -> 1x1)
    a = "audio_sequences"
    a = g.conv(a, 1, C(32), 3, 1, 1); a = g.res(a, C(32), 2)
    a = g.conv(a, C(32), C(64), 3, (3, 1), 1); a = g.res(a, C(64), 2)
    a = g.conv(a, C(64), C(128), 3, 3, 1); a = g.res(a, C(128), 2)
    a = g.conv(a, C(128), C(256), 3, (3, 2), 1); a = g.res(a, C(256), 1)
    a = g.conv(a, C(256), C(512), 3, 1, 0); a = g.conv(a, C(512), C(512), 1, 1, 0)
    # decoder: each block, then concatenate the matching face feature
    def cat(x: str, cx: int) -> tuple[str, int]:
        f, cf = feats.pop()
        y = g.name("cat")
        g.nodes.append(helper.make_node("Concat", [x, f], [y], axis=1))
        return y, cx + cf

    x, c = g.conv(a, C(512), C(512), 1, 1, 0), C(512)
    x, c = cat(x, c)
    for cout, k, s, p, op, n_res in ((512, 3, 1, 0, 0, 1), (512, 3, 2, 1, 1, 2), (384, 3, 2, 1, 1, 2),
                                     (256, 3, 2, 1, 1, 2), (128, 3, 2, 1, 1, 2), (64, 3, 2, 1, 1, 2)):
        x = g.conv(x, c, C(cout), k, s, p, transpose=True, output_padding=op)
        x = g.res(x, C(cout), n_res)
        x, c = cat(x, C(cout))
    x = g.conv(x, c, C(32), 3, 1, 1)
    x = g.conv(x, C(32), 3, 1, 1, 0, act=False)
    g.nodes.append(helper.make_node("Sigmoid", [x], ["output"]))

    b = batch if batch else "batch"
    elem = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes, "wav2lip96_random",
        [helper.make_tensor_value_info("audio_sequences", elem, [b, 1, 80, 16]),
         helper.make_tensor_value_info("face_sequences", elem, [b, 6, 96, 96])],
        [helper.make_tensor_value_info("output", elem, [b, 3, 96, 96])], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lipsync-cluster bench",
                              doc_string="random weights, Wav2Lip-96 architecture: for benchmarks only")
    model.ir_version = IR_VERSION
    if float16:
        for i, init in enumerate(model.graph.initializer):
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    helper.set_model_props(model, {"lipsync.crop": "wav2lip"})
    onnx.checker.check_model(model)
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) for i in model.graph.initializer))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", default="dynamic")
    ap.add_argument("--float16", action="store_true")
    args = ap.parse_args()
    m = build_wav2lip96(args.width, None if args.batch == "dynamic" else int(args.batch), args.float16)
    onnx.save(m, args.output)
    print(f"wrote {args.output}: {parameter_count(m) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
