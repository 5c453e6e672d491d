"""A random-weight ONNX model with the layers and the I/O contract of the public Wav2Lip-96 generator.

Built with `onnx.helper` (no torch): the face encoder, audio encoder and face decoder of
Wav2Lip's `models/wav2lip.py` (Conv2d + folded BatchNorm + ReLU blocks, residual blocks,
transposed convolutions with skip concatenations, sigmoid output), about 36 M parameters. The
weights are random (He-scaled, fixed seed), so the output is meaningless but the model stage costs
what the real generator costs: same convolutions, same shapes, same bytes.

Contract (as the real export): inputs `mel` float32 [B,1,80,16] and `face` float32 [B,6,96,96],
output `output` float32 [B,3,96,96] in [0,1]; B dynamic.

    python -m bench.wav2lip_sized OUT.onnx        # or build_wav2lip_sized(path) from Python
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SIZE = 96

# (in, out, kernel, stride, padding, residual) for each Conv2d block; a residual block keeps in == out.
FACE_ENCODER = [
    [(6, 16, 7, 1, 3, False)],
    [(16, 32, 3, 2, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True)],
    [(32, 64, 3, 2, 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True)],
    [(64, 128, 3, 2, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True)],
    [(128, 256, 3, 2, 1, False), (256, 256, 3, 1, 1, True), (256, 256, 3, 1, 1, True)],
    [(256, 512, 3, 2, 1, False), (512, 512, 3, 1, 1, True)],
    [(512, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False)],
]
AUDIO_ENCODER = [
    (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
]
# Each decoder block: a (transposed, except the first) conv then residual convs; its output is
# concatenated with the matching face-encoder feature (deepest first).
# transposed: (in, out, kernel, stride, padding, output_padding)
FACE_DECODER = [
    ("conv", (512, 512, 1, 1, 0), []),
    ("convT", (1024, 512, 3, 1, 0, 0), [512]),
    ("convT", (1024, 512, 3, 2, 1, 1), [512, 512]),
    ("convT", (768, 384, 3, 2, 1, 1), [384, 384]),
    ("convT", (512, 256, 3, 2, 1, 1), [256, 256]),
    ("convT", (320, 128, 3, 2, 1, 1), [128, 128]),
    ("convT", (160, 64, 3, 2, 1, 1), [64, 64]),
]
OUTPUT_BLOCK = [(80, 32, 3, 1, 1, False)]  # then Conv2d(32, 3, 1) + Sigmoid


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, tuple) else [v, v]


class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.params = 0
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def weight(self, shape: tuple[int, ...], fan_in: int, gain: float) -> str:
        from onnx import numpy_helper

        w = (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(gain / np.sqrt(fan_in)))
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(w, name))
        self.params += w.size
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride, pad: int, residual: bool,
             act: str | None = "Relu") -> str:
        """Conv2d + (folded) BatchNorm + ReLU, with the input added before the ReLU when residual."""
        from onnx import helper

        # residual branches start small so that activations stay bounded over the deep stack
        w = self.weight((cout, cin, k, k), cin * k * k, 0.3 if residual else 1.2)
        b = self.weight((cout,), 1, 0.01)
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k],
                                           strides=_pair(stride), pads=[pad] * 4))
        if residual:
            s = self.name("add")
            self.nodes.append(helper.make_node("Add", [y, x], [s]))
            y = s
        if act:
            a = self.name(act.lower())
            self.nodes.append(helper.make_node(act, [y], [a]))
            y = a
        return y

    def conv_t(self, x: str, cin: int, cout: int, k: int, stride: int, pad: int, out_pad: int) -> str:
        from onnx import helper

        w = self.weight((cin, cout, k, k), cin * k * k // (stride * stride), 1.2)
        b = self.weight((cout,), 1, 0.01)
        y = self.name("convT")
        self.nodes.append(helper.make_node("ConvTranspose", [x, w, b], [y], kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[pad] * 4,
                                           output_padding=[out_pad, out_pad]))
        r = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [y], [r]))
        return r

    def concat(self, a: str, b: str) -> str:
        from onnx import helper

        y = self.name("cat")
        self.nodes.append(helper.make_node("Concat", [a, b], [y], axis=1))
        return y


def build_model(seed: int = 0):
    """The ModelProto (IR version 10, opset 17) and its parameter count."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph(seed)
    feats, x = [], "face"
    for block in FACE_ENCODER:
        for spec in block:
            x = g.conv(x, *spec)
        feats.append(x)
    a = "mel"
    for spec in AUDIO_ENCODER:
        a = g.conv(a, *spec)
    x = a  # [B,512,1,1] audio embedding
    for kind, spec, residual in FACE_DECODER:
        x = g.conv(x, *spec, False) if kind == "conv" else g.conv_t(x, *spec)
        for c in residual:
            x = g.conv(x, c, c, 3, 1, 1, True)
        x = g.concat(x, feats.pop())
    for spec in OUTPUT_BLOCK:
        x = g.conv(x, *spec)
    x = g.conv(x, 32, 3, 1, 1, 0, False, act="Sigmoid")
    g.nodes.append(helper.make_node("Identity", [x], ["output"]))

    graph = helper.make_graph(
        g.nodes, "wav2lip96_sized",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["B", 1, 80, 16]),
         helper.make_tensor_value_info("face", TensorProto.FLOAT, ["B", 6, SIZE, SIZE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 3, SIZE, SIZE])],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="lipsync-cluster bench")
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
    onnx.checker.check_model(model)
    return model, g.params


def build_wav2lip_sized(path: str | os.PathLike, seed: int = 0) -> str:
    """Write the model to `path` (atomically; reused when it already exists). Returns the path."""
    import onnx

    path = Path(path)
    if path.is_file():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model, _ = build_model(seed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return str(path)


def parameter_count() -> int:
    """Parameters of the layer specification (weights and biases), without building the graph."""
    def conv(cin, cout, k, *_):
        return cin * cout * k * k + cout

    n = sum(conv(*spec) for block in FACE_ENCODER for spec in block)
    n += sum(conv(*spec) for spec in AUDIO_ENCODER)
    for _, spec, residual in FACE_DECODER:
        n += conv(*spec[:3]) + sum(conv(c, c, 3) for c in residual)
    n += sum(conv(*spec) for spec in OUTPUT_BLOCK) + conv(32, 3, 1)
    return n


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "wav2lip96_sized.onnx"
    print(build_wav2lip_sized(out))
