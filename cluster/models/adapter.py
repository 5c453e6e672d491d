"""Run a Wav2Lip-class ONNX model: resolve its inputs by shape, batch, convert crops.

The contract (DESIGN.md, "Model contract"): a mel input float32 [B,1,80,16], a face input
float32 [B,6,S,S] (BGR in [0,1]; channels 0-2 the crop with its lower half zeroed, 3-5 the
reference crop), an output float32 [B,3,S,S] in [0,1]. Names differ between exports, so the roles
are found by shape. The batch dimension is dynamic (symbolic, None or -1) or fixed; a fixed batch
is run in slices of that size (the last one padded), and so is a dynamic one when `pad_batch` is
set (on GPUs: one input shape, so TensorRT builds one engine and CUDA reuses its arena).
float16 exports (tensor(float16) inputs and output) run too: `generate` builds the face input in
float16 straight from the uint8 crops and turns the float16 output straight into uint8 with
OpenCV's vectorised conversions (numpy's float16 casts are scalar loops: at batch 64 they cost
23 ms of CPU per batch against 6 ms for float32, which made a float16 export slower end to end
than its float32 twin on an H200 although the float16 graph itself runs 1.2-1.5x faster there);
`infer` (the raw contract) casts at the edge and returns float32.

The crop recipe a model was trained on (`CROP_RECIPES`) is read from the ONNX metadata
`lipsync.crop` when present, else it follows from S: 96 -> `wav2lip` (detector box, like every
public Wav2Lip-96 export), other sizes -> `aligned`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cluster.errors import ModelContractError, ModelInferenceError, ModelLoadError
from cluster.fsutil import file_sha256
from cluster.models.providers import (
    TENSORRT,
    active_providers,
    provider_name,
    select_providers,
    tensorrt_cache_of_model,
    tensorrt_profiles,
)

log = logging.getLogger("lipsync.models")

MEL_SHAPE = (1, 80, 16)
STANDARD_SIZES = (96, 256, 384)
MIN_SIZE = 32
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_ONNX_ELEM_TYPES = {1: "tensor(float)", 10: "tensor(float16)"}
CROP_RECIPES = ("wav2lip", "aligned")
CROP_METADATA_KEY = "lipsync.crop"
FACE_INPUT_METADATA_KEY = "lipsync.face_input"
"""`reference`: the model reads only the reference crop (channels 3-5 of its face input), so the
masked crop of channels 0-2 is not built (zeros instead). Absent: Wav2Lip's full face input."""


def scaled_float16(planes: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W] -> float16 x/255, bit-equal to numpy's float32 x*(1/255) cast to float16,
    with OpenCV's vectorised conversion (a gather through a 256-entry table where this OpenCV
    build has no float16 arithmetic)."""
    import cv2

    flat = np.ascontiguousarray(planes).reshape(-1, planes.shape[-1])
    try:
        return cv2.multiply(flat, 1.0 / 255.0, dtype=cv2.CV_16F).reshape(planes.shape)
    except cv2.error:
        return _FLOAT16_OF_BYTE[planes]


def unit_to_uint8(out: np.ndarray) -> np.ndarray:
    """float32 or float16 in [0,1] -> uint8 round(x*255) saturated, NaN -> 0: numpy's
    `rint(clip(x * 255, 0, 255))` cast to uint8, vectorised (OpenCV's saturating conversion, one
    pass; a 65536-entry table over the float16 bit patterns where OpenCV has no float16 arithmetic)."""
    import cv2

    flat = np.ascontiguousarray(out).reshape(-1, out.shape[-1])
    try:
        got = cv2.multiply(flat, 255.0, dtype=cv2.CV_8U)
    except cv2.error:
        if flat.dtype != np.float16:
            raise
        return _UINT8_OF_FLOAT16[flat.view(np.uint16)].reshape(out.shape)
    if flat.dtype == np.float16:
        nan = (flat.view(np.uint16) & 0x7FFF) > 0x7C00  # NaN bit patterns (np.isnan is a scalar loop here)
    else:
        nan = np.isnan(flat)  # OpenCV saturates NaN to 255
    if nan.any():
        got[nan] = 0
    return got.reshape(out.shape)


def channels_first(images: np.ndarray) -> np.ndarray:
    """uint8 [B,H,W,C] -> [B,C,H,W], contiguous (OpenCV's split per item into the planes: faster than
    numpy's strided copy); the inverse of `channels_last`."""
    import cv2

    out = np.empty((images.shape[0], images.shape[3], *images.shape[1:3]), np.uint8)
    for i in range(images.shape[0]):
        cv2.split(images[i], list(out[i]))
    return out


def channels_last(planes: np.ndarray) -> np.ndarray:
    """uint8 [B,C,H,W] -> [B,H,W,C], contiguous (OpenCV's merge per item: several times faster than
    numpy's strided copy)."""
    import cv2

    out = np.empty((planes.shape[0], *planes.shape[2:], planes.shape[1]), np.uint8)
    for i in range(planes.shape[0]):
        cv2.merge(tuple(planes[i]), dst=out[i])
    return out


_FLOAT16_OF_BYTE = (np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)).astype(np.float16)
with np.errstate(invalid="ignore", over="ignore"):
    _UINT8_OF_FLOAT16 = np.rint(np.clip(np.nan_to_num(
        np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32) * np.float32(255.0), nan=0.0),
        0.0, 255.0)).astype(np.uint8)


def default_crop(size: int) -> str:
    """The crop recipe a model of side S is assumed to be trained on without metadata."""
    return "wav2lip" if int(size) == 96 else "aligned"

EXPECTED = ("inputs: mel float32 [B,1,80,16] and face float32 [B,6,S,S] with S in 96, 256, 384 "
            "(any square S >= 32 accepted); output float32 [B,3,S,S]; B dynamic or fixed")


def _describe(args) -> str:
    return ", ".join(f"{a.name!r} {a.type} {list(a.shape)}" for a in args) or "none"


def _fixed(dim: Any) -> int | None:
    """A dimension's fixed size, or None when it is symbolic / unknown / -1."""
    return int(dim) if isinstance(dim, (int, np.integer)) and int(dim) > 0 else None


@dataclass(frozen=True)
class _Contract:
    mel_name: str
    face_name: str
    output_name: str
    size: int
    batch_fixed: int | None
    dtype: type


def resolve_contract(inputs: Sequence[Any], outputs: Sequence[Any], path: str) -> _Contract:
    """Match onnxruntime NodeArgs (name, shape, type) to the Wav2Lip roles, by shape.

    Raises ModelContractError listing what was expected and what the model has.
    """
    def fail(problem: str) -> ModelContractError:
        return ModelContractError(
            f"model {path} does not fit the Wav2Lip contract: {problem}. Expected {EXPECTED}. "
            f"Found inputs: {_describe(inputs)}; outputs: {_describe(outputs)}", path=path)

    mels = [a for a in inputs if len(a.shape) == 4 and [_fixed(d) for d in a.shape[1:]] == list(MEL_SHAPE)]
    faces = [a for a in inputs if len(a.shape) == 4 and _fixed(a.shape[1]) == 6]
    if len(inputs) != 2:
        raise fail(f"it has {len(inputs)} inputs, expected 2")
    if len(mels) != 1:
        raise fail("no input of shape [B,1,80,16] (the mel window)")
    if len(faces) != 1 or faces[0] is mels[0]:
        raise fail("no input of shape [B,6,S,S] (crop with lower half masked + reference crop)")
    mel, face = mels[0], faces[0]
    h, w = _fixed(face.shape[2]), _fixed(face.shape[3])
    if h is None or w is None or h != w or h < MIN_SIZE:
        raise fail(f"face input {face.name!r} must have a fixed square size S >= {MIN_SIZE}, got {list(face.shape)}")
    size = h
    outs = [o for o in outputs if len(o.shape) == 4 and _fixed(o.shape[1]) in (3, None)
            and all(_fixed(d) in (size, None) for d in o.shape[2:])]
    if not outs:
        raise fail(f"no output of shape [B,3,{size},{size}]")
    out = outs[0]
    for arg in (mel, face, out):
        if arg.type not in _FLOAT_TYPES:
            raise fail(f"{arg.name!r} has type {arg.type}, expected tensor(float) (or tensor(float16))")
    if len({mel.type, face.type}) != 1:
        raise fail(f"mel and face inputs have different types ({mel.type}, {face.type})")
    batches = {b for b in (_fixed(mel.shape[0]), _fixed(face.shape[0])) if b is not None}
    if len(batches) > 1:
        raise fail(f"mel and face inputs fix different batch sizes {sorted(batches)}")
    batch_fixed = batches.pop() if batches else None
    if size not in STANDARD_SIZES:
        log.warning("model %s uses a non-standard crop size S=%d (standard: %s)", path, size, STANDARD_SIZES)
    return _Contract(mel.name, face.name, out.name, size, batch_fixed, _FLOAT_TYPES[mel.type])


class _Arg:
    """name/shape/type of a graph input or output read from the ONNX file (as onnxruntime's NodeArg)."""

    def __init__(self, vi) -> None:
        self.name = vi.name
        t = vi.type.tensor_type
        self.type = _ONNX_ELEM_TYPES.get(t.elem_type, f"elem_type {t.elem_type}")
        self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def contract_from_file(path: str) -> _Contract:
    """The contract read from the ONNX file itself (without a session; weights not loaded)."""
    import onnx

    try:
        m = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf / IO errors
        raise ModelLoadError(f"cannot read model {path} as ONNX: {exc}", path=path,
                             cause=f"{type(exc).__name__}: {exc}") from exc
    inits = {i.name for i in m.graph.initializer}
    inputs = [_Arg(vi) for vi in m.graph.input if vi.name not in inits]
    return resolve_contract(inputs, [_Arg(vi) for vi in m.graph.output], path)


def external_data_files(path: str) -> list[str]:
    """The files an ONNX model keeps its weights in besides itself (`save_as_external_data`: newer
    exporters write `model.onnx.data` next to a large model), by their location in the model."""
    import onnx

    try:
        m = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf / IO errors
        raise ModelLoadError(f"cannot read model {path} as ONNX: {exc}", path=path,
                             cause=f"{type(exc).__name__}: {exc}") from exc
    files = set()
    for tensor in m.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(files)


class LipSyncModel:
    """A loaded Wav2Lip-class model. Create with `LipSyncModel.load(path)`.

    `generate(mel_windows, crops)` maps mel windows [B,1,80,16] and aligned BGR uint8 crops
    [B,S,S,3] to generated crops of the same shape; `infer` is the raw float contract.
    """

    def __init__(self, session, contract: _Contract, path: str, pad_batch: int | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        self._session = session
        self._c = contract
        self.path = path
        self.pad_batch = pad_batch
        self.metadata = dict(metadata or {})
        crop = self.metadata.get(CROP_METADATA_KEY, "").strip().lower()
        if crop and crop not in CROP_RECIPES:
            raise ModelContractError(f"model {path}: metadata {CROP_METADATA_KEY}={crop!r} is not a known crop "
                                     f"recipe (expected one of {list(CROP_RECIPES)})", path=path)
        self.crop = crop or default_crop(contract.size)
        face_input = self.metadata.get(FACE_INPUT_METADATA_KEY, "").strip().lower()
        if face_input and face_input != "reference":
            raise ModelContractError(f"model {path}: metadata {FACE_INPUT_METADATA_KEY}={face_input!r} is not "
                                     f"known (expected 'reference' or no such key)", path=path)
        self.reference_only = face_input == "reference"

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, providers: list | None = None, threads: int = 0,
             pad_batch: int | None = None) -> "LipSyncModel":
        """Open the ONNX file at `path` with onnxruntime (`providers` default:
        `select_providers()`; `threads`: intra-op threads, 0 for onnxruntime's default) and
        resolve its contract. `pad_batch`: run every batch at exactly this size (padded; larger
        ones in slices), and give TensorRT its batch profiles for it.

        Raises ModelLoadError when the file is missing or not a loadable ONNX model, and
        ModelContractError when its inputs/outputs fit no known contract.
        """
        import onnxruntime as ort

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelLoadError(f"model file {path} does not exist or is not a file", path=path)
        providers = list(providers) if providers is not None else select_providers()
        if any(provider_name(p) == TENSORRT for p in providers):
            c = contract_from_file(path)
            providers = tensorrt_profiles(providers, c.mel_name, c.face_name, c.size,
                                          c.batch_fixed or pad_batch or 1)
            providers = tensorrt_cache_of_model(providers, file_sha256(path)[:16])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # idle intra-op threads sleep instead of spinning: same speed, and on a node whose cores the
        # compositors share, 1.5x less CPU per frame for the built-in model (docs/PERFORMANCE.md)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = int(threads)
        t0 = time.monotonic()
        try:
            session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated types (Fail, InvalidProtobuf, ...)
            raise ModelLoadError(f"cannot load model {path} as ONNX with providers "
                                 f"{[provider_name(p) for p in providers]}: {exc}",
                                 path=path, cause=f"{type(exc).__name__}: {exc}") from exc
        contract = resolve_contract(session.get_inputs(), session.get_outputs(), path)
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        model = cls(session, contract, path, pad_batch=pad_batch, metadata=metadata)
        log.info("loaded model %s in %.2f s: S=%d, %s, crop %s, batch=%s, inputs mel=%r face=%r, providers %s",
                 path, time.monotonic() - t0, contract.size, model.precision, model.crop,
                 contract.batch_fixed or "dynamic", contract.mel_name, contract.face_name, model.providers)
        return model

    # --- properties ----------------------------------------------------------------------
    @property
    def intra_op_threads(self) -> int:
        """The session's intra-op threads as configured (0: onnxruntime's default, every core)."""
        return self._session.get_session_options().intra_op_num_threads

    @property
    def size(self) -> int:
        """Crop side S the model works at."""
        return self._c.size

    @property
    def batch_fixed(self) -> int | None:
        """The export's fixed batch size, or None when the batch dimension is dynamic."""
        return self._c.batch_fixed

    @property
    def precision(self) -> str:
        """'float32' or 'float16': the element type of the export's inputs."""
        return np.dtype(self._c.dtype).name

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses."""
        return active_providers(self._session)

    @property
    def input_names(self) -> dict[str, str]:
        """{'mel': name, 'face': name} as resolved by shape."""
        return {"mel": self._c.mel_name, "face": self._c.face_name}

    def __repr__(self) -> str:
        return (f"LipSyncModel({self.path!r}, size={self.size}, crop={self.crop!r}, precision={self.precision!r}, "
                f"batch_fixed={self.batch_fixed})")

    # --- running -------------------------------------------------------------------------
    def infer(self, mel: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """Raw contract: mel float32 [B,1,80,16], faces float32 [B,6,S,S] -> float32 [B,3,S,S].

        Raises ModelInferenceError for wrong shapes or when onnxruntime fails (its text as cause).
        """
        return self._infer_in_precision(mel, faces).astype(np.float32, copy=False)

    def _infer_in_precision(self, mel: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """`infer`, its output left in the export's precision (float16 exports: float16)."""
        S = self.size
        mel = np.asarray(mel)
        faces = np.asarray(faces)
        if mel.ndim != 4 or mel.shape[1:] != MEL_SHAPE:
            raise ModelInferenceError(f"model {self.path}: mel batch must be [B,1,80,16], got {list(mel.shape)}",
                                      path=self.path)
        if faces.ndim != 4 or faces.shape[1:] != (6, S, S):
            raise ModelInferenceError(f"model {self.path}: face batch must be [B,6,{S},{S}], got {list(faces.shape)}",
                                      path=self.path)
        if mel.shape[0] != faces.shape[0]:
            raise ModelInferenceError(f"model {self.path}: {mel.shape[0]} mel windows but {faces.shape[0]} faces",
                                      path=self.path)
        n = mel.shape[0]
        if n == 0:
            return np.zeros((0, 3, S, S), np.float32)
        dtype = self._c.dtype
        mel = np.ascontiguousarray(mel, dtype=dtype)
        faces = np.ascontiguousarray(faces, dtype=dtype)
        step = self.batch_fixed or self.pad_batch or n
        parts = []
        for b0 in range(0, n, step):
            m, f = mel[b0:b0 + step], faces[b0:b0 + step]
            k = m.shape[0]
            if k < step:  # pad the last slice to the one shape the session runs at
                m = np.concatenate([m, np.repeat(m[-1:], step - k, axis=0)])
                f = np.concatenate([f, np.repeat(f[-1:], step - k, axis=0)])
            parts.append(self._run(m, f)[:k])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, mel: np.ndarray, faces: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._session.run([self._c.output_name], {self._c.mel_name: mel, self._c.face_name: faces})
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelInferenceError(f"model {self.path} failed on a batch of {mel.shape[0]} "
                                      f"(mel {list(mel.shape)}, faces {list(faces.shape)}): {exc}",
                                      path=self.path, cause=f"{type(exc).__name__}: {exc}") from exc
        S = self.size
        if out.shape != (mel.shape[0], 3, S, S):
            raise ModelInferenceError(f"model {self.path} returned shape {list(out.shape)}, "
                                      f"expected [{mel.shape[0]},3,{S},{S}]", path=self.path)
        return out

    def generate(self, mel_windows: np.ndarray, crops: np.ndarray) -> np.ndarray:
        """Generated crops for mel windows float32 [B,1,80,16] and aligned crops uint8 BGR
        [B,S,S,3]: the face input is built as in Wav2Lip's inference (the crop with rows >= S/2
        zeroed, then the crop itself as reference, scaled to [0,1], NCHW); the output is clipped
        to [0,1] and rounded back to uint8 BGR [B,S,S,3]."""
        S = self.size
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (S, S, 3) or crops.dtype != np.uint8:
            raise ModelInferenceError(f"model {self.path}: crops must be uint8 [B,{S},{S},3], "
                                      f"got {crops.dtype} {list(crops.shape)}", path=self.path)
        # written in place into one array: a third of the CPU of scaling, concatenating and
        # zeroing as separate steps
        dtype = self._c.dtype
        faces = np.empty((crops.shape[0], 6, S, S), dtype)
        planes = channels_first(crops)
        if dtype == np.float32:
            np.multiply(planes, np.float32(1.0 / 255.0), out=faces[:, 3:])
        else:
            faces[:, 3:] = scaled_float16(planes)
        if self.reference_only:  # the masked crop is never read (a contiguous block per item: a memset)
            faces[:, :3] = 0.0
        else:
            faces[:, :3, :S // 2] = faces[:, 3:, :S // 2]
            faces[:, :3, S // 2:] = 0.0
        return channels_last(unit_to_uint8(self._infer_in_precision(mel_windows, faces)))

    def warmup(self, batch_size: int | None = None) -> float:
        """Run one batch (default: the fixed batch, else 1) of silence on grey crops so the
        first real batch does not pay for lazy initialisation. Returns the seconds it took."""
        b = batch_size or self.batch_fixed or self.pad_batch or 1
        t0 = time.monotonic()
        self.generate(np.full((b, *MEL_SHAPE), -4.0, np.float32),
                      np.full((b, self.size, self.size, 3), 128, np.uint8))
        return time.monotonic() - t0
