"""Model adapter (Wav2Lip contract resolved by shape), built-in procedural model, providers."""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cluster.config import Settings
from cluster.errors import ModelContractError, ModelInferenceError, ModelLoadError
from cluster.faces import canonical
from cluster.models import (
    LipSyncModel,
    ReplicatedModel,
    build_builtin_model,
    builtin_model_path,
    crop_for_spec,
    crop_recipe,
    list_models,
    load_model,
    load_model_on_devices,
)
from cluster.models import builtin as builtin_mod
from cluster.models.adapter import contract_from_file
from cluster.models.providers import (
    CPU,
    CUDA,
    TENSORRT,
    DeviceFacts,
    active_providers,
    cuda_device_count,
    device_ordinals,
    parse_providers,
    provider_name,
    select_providers,
    tensorrt_profiles,
)

CPU_ONLY = [CPU]


# --- test models ---------------------------------------------------------------------------
def _save(model: onnx.ModelProto, path) -> str:
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _batch(batch):
    return "batch" if batch is None else batch


def wav2lip_like(path, mel_name: str, face_name: str, out_name: str, size: int, batch=None,
                 face_first: bool = False, seed: int = 0, mel_dims=(1, 80, 16), face_channels: int = 6) -> str:
    """A small random-weight model with a public Wav2Lip export's inputs and outputs:
    face -> AveragePool /2 -> Conv 3x3 -> Resize x2 -> + mean(mel) -> Sigmoid."""
    rng = np.random.default_rng(seed)
    b = _batch(batch)
    mel = helper.make_tensor_value_info(mel_name, TensorProto.FLOAT, [b, *mel_dims])
    face = helper.make_tensor_value_info(face_name, TensorProto.FLOAT, [b, face_channels, size, size])
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [b, 3, size, size])
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (3, face_channels, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, (3,)).astype(np.float32), "bias"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([0.5], np.float32), "mel_gain")]
    nodes = [
        helper.make_node("AveragePool", [face_name], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pooled", "w", "bias"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["conv", "", "scales"], ["up"], mode="linear"),
        helper.make_node("ReduceMean", [mel_name], ["mel_mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Mul", ["mel_mean", "mel_gain"], ["mel_term"]),
        helper.make_node("Add", ["up", "mel_term"], ["pre"]),
        helper.make_node("Sigmoid", ["pre"], [out_name]),
    ]
    inputs = [face, mel] if face_first else [mel, face]
    graph = helper.make_graph(nodes, "wav2lip_like", inputs, [out], initializer=inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def channel_picker(path, size: int, first_channel: int, batch=None) -> str:
    """A model whose output is face channels [first_channel, first_channel+3) (mel unused)."""
    b = _batch(batch)
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("s", [first_channel]), ("e", [first_channel + 3]), ("ax", [1]))]
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    nodes = [helper.make_node("Slice", ["video_frames", "s", "e", "ax"], ["picked"]),
             helper.make_node("ReduceMean", ["mel_spectrogram"], ["m"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Mul", ["m", "zero"], ["m0"]),
             helper.make_node("Add", ["picked", "m0"], ["output"])]
    graph = helper.make_graph(
        nodes, "picker",
        [helper.make_tensor_value_info("mel_spectrogram", TensorProto.FLOAT, [b, 1, 80, 16]),
         helper.make_tensor_value_info("video_frames", TensorProto.FLOAT, [b, 6, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [b, 3, size, size])], initializer=inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _random_inputs(n: int, size: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    mel = rng.uniform(-4, 4, (n, 1, 80, 16)).astype(np.float32)
    crops = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return mel, crops


# --- adapter ---------------------------------------------------------------------------------
EXPORTS = [
    # (mel name, face name, output name, S, batch, face listed first)
    ("mel_spectrogram", "video_frames", "output", 96, None, False),
    ("mel_spectrogram", "video_frames", "output", 256, 1, False),
    ("audio_sequences", "face_sequences", "output", 96, 1, False),
    ("audio_sequences", "face_sequences", "pred", 256, None, True),
    ("target", "source", "output", 96, None, True),
    ("source", "target", "out", 96, 1, False),
]


@pytest.mark.parametrize("mel_name,face_name,out_name,size,batch,face_first", EXPORTS)
def test_public_export_layouts_load_and_generate(tmp_path, mel_name, face_name, out_name, size, batch, face_first):
    path = wav2lip_like(tmp_path / "m.onnx", mel_name, face_name, out_name, size, batch, face_first)
    model = LipSyncModel.load(path, providers=CPU_ONLY)
    assert model.size == size
    assert model.batch_fixed == batch
    assert model.input_names == {"mel": mel_name, "face": face_name}
    assert model.providers == CPU_ONLY
    assert model.path == path

    mel, crops = _random_inputs(3, size)
    out = model.generate(mel, crops)
    assert out.shape == (3, size, size, 3) and out.dtype == np.uint8
    # a batch gives what its items give one by one (fixed-batch exports loop internally)
    for i in range(3):
        np.testing.assert_array_equal(model.generate(mel[i:i + 1], crops[i:i + 1])[0], out[i])
    # the mel input is really wired to the mel role: other mel, other output
    assert not np.array_equal(model.generate(np.full_like(mel, 4.0), crops),
                              model.generate(np.full_like(mel, -4.0), crops))
    assert model.warmup() >= 0


def test_the_built_in_model_is_named_by_its_spec_not_by_a_prefix():
    """One pattern says which specs are the built-in model (the model worker's threads, a live
    session's mel columns and crop, the sessions API's model directory all ask it): a model file
    whose name starts with "builtin" is a network like any other."""
    from cluster.live.speech import MEL_STEP, model_columns
    from cluster.models import is_named_model
    from cluster.models.builtin import READ_COLUMNS
    from cluster.schemas import is_builtin_model

    for spec in ("builtin", "builtin:96", "builtin-128", " builtin "):
        assert is_builtin_model(spec) and is_named_model(spec) and model_columns(spec) == READ_COLUMNS
    for spec in ("builtin_lips.onnx", "builtins", "/models/builtin.onnx", "latency:5", "builtin:"):
        assert not is_builtin_model(spec)
        assert model_columns(spec) == MEL_STEP
    assert READ_COLUMNS < MEL_STEP


def test_unnamed_dynamic_batch_dimension(tmp_path):
    path = wav2lip_like(tmp_path / "m.onnx", "mel_spectrogram", "video_frames", "output", 96, batch=None)
    m = onnx.load(path)
    for vi in [*m.graph.input, *m.graph.output]:
        vi.type.tensor_type.shape.dim[0].Clear()  # neither dim_value nor dim_param
    onnx.save(m, path)
    model = LipSyncModel.load(path, providers=CPU_ONLY)
    assert model.batch_fixed is None
    assert model.generate(*_random_inputs(2, 96)).shape == (2, 96, 96, 3)


def test_face_input_is_built_like_wav2lip(tmp_path):
    size = 96
    mel, crops = _random_inputs(2, size)
    masked = LipSyncModel.load(channel_picker(tmp_path / "masked.onnx", size, 0), providers=CPU_ONLY)
    out = masked.generate(mel, crops)
    np.testing.assert_array_equal(out[:, :size // 2], crops[:, :size // 2])
    assert not out[:, size // 2:].any()
    reference = LipSyncModel.load(channel_picker(tmp_path / "ref.onnx", size, 3, batch=1), providers=CPU_ONLY)
    np.testing.assert_array_equal(reference.generate(mel, crops), crops)  # exact uint8 round trip


def test_a_model_that_reads_only_the_reference_gets_no_masked_crop(tmp_path):
    """`lipsync.face_input=reference` (the built-in model's metadata): channels 0-2 of the face
    input are zeros instead of the masked crop, the reference is as before; another value is a
    contract error naming the key."""
    size = 96
    mel, crops = _random_inputs(2, size)
    masked_path = channel_picker(tmp_path / "masked.onnx", size, 0)
    m = onnx.load(masked_path)
    helper.set_model_props(m, {"lipsync.face_input": "reference"})
    onnx.save(m, masked_path)
    model = LipSyncModel.load(masked_path, providers=CPU_ONLY)
    assert model.reference_only
    assert not model.generate(mel, crops).any()  # what channels 0-2 held: zeros
    ref_path = channel_picker(tmp_path / "ref.onnx", size, 3)
    m = onnx.load(ref_path)
    helper.set_model_props(m, {"lipsync.face_input": "reference"})
    onnx.save(m, ref_path)
    np.testing.assert_array_equal(LipSyncModel.load(ref_path, providers=CPU_ONLY).generate(mel, crops), crops)
    helper.set_model_props(m, {"lipsync.face_input": "masked-and-reference"})
    onnx.save(m, ref_path)
    with pytest.raises(ModelContractError, match="lipsync.face_input"):
        LipSyncModel.load(ref_path, providers=CPU_ONLY)


def test_generate_rounds_and_clips(tmp_path):
    model = LipSyncModel.load(channel_picker(tmp_path / "ref.onnx", 96, 3), providers=CPU_ONLY)
    mel, crops = _random_inputs(1, 96)
    faces = np.zeros((1, 6, 96, 96), np.float32)
    faces[0, 3:] = crops[0].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(model.infer(mel, faces)[0], faces[0, 3:], atol=1e-7)


@pytest.mark.parametrize("mel_dims,face_channels,problem", [
    ((1, 80, 16), 3, "[B,6,S,S]"),
    ((1, 80, 20), 6, "[B,1,80,16]"),
])
def test_wrong_contract_is_rejected_with_expected_and_found(tmp_path, mel_dims, face_channels, problem):
    path = wav2lip_like(tmp_path / "bad.onnx", "audio_sequences", "face_sequences", "output", 96,
                        mel_dims=mel_dims, face_channels=face_channels)
    with pytest.raises(ModelContractError) as exc:
        LipSyncModel.load(path, providers=CPU_ONLY)
    msg = str(exc.value)
    assert path in msg and problem in msg
    assert "Expected inputs: mel float32 [B,1,80,16] and face float32 [B,6,S,S]" in msg
    assert f"'face_sequences' tensor(float) ['batch', {face_channels}, 96, 96]" in msg
    assert f"'audio_sequences' tensor(float) ['batch', {', '.join(map(str, mel_dims))}]" in msg
    assert exc.value.code == "model.invalid_contract"


def test_non_square_face_is_rejected(tmp_path):
    path = wav2lip_like(tmp_path / "m.onnx", "mel_spectrogram", "video_frames", "output", 96)
    m = onnx.load(path)
    m.graph.input[1].type.tensor_type.shape.dim[3].dim_value = 64
    onnx.save(m, path)
    with pytest.raises(ModelContractError, match="fixed square size"):
        LipSyncModel.load(path, providers=CPU_ONLY)


def test_unreadable_files_raise_load_error_naming_the_path(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(ModelLoadError) as exc:
        LipSyncModel.load(junk, providers=CPU_ONLY)
    assert str(junk) in str(exc.value) and exc.value.cause
    missing = tmp_path / "nope" / "model.onnx"
    for call in (lambda: LipSyncModel.load(missing), lambda: load_model(str(missing), Settings(storage_root=tmp_path))):
        with pytest.raises(ModelLoadError, match=str(missing)):
            call()


def test_infer_validates_shapes_and_wraps_runtime_errors(tmp_path):
    model = LipSyncModel.load(wav2lip_like(tmp_path / "m.onnx", "mel_spectrogram", "video_frames", "output", 96),
                              providers=CPU_ONLY)
    with pytest.raises(ModelInferenceError, match=r"\[B,1,80,16\]"):
        model.infer(np.zeros((2, 1, 80, 12), np.float32), np.zeros((2, 6, 96, 96), np.float32))
    with pytest.raises(ModelInferenceError, match="2 mel windows but 3 faces"):
        model.infer(np.zeros((2, 1, 80, 16), np.float32), np.zeros((3, 6, 96, 96), np.float32))
    with pytest.raises(ModelInferenceError, match="uint8"):
        model.generate(np.zeros((1, 1, 80, 16), np.float32), np.zeros((1, 96, 96, 3), np.float32))
    empty = model.generate(np.zeros((0, 1, 80, 16), np.float32), np.zeros((0, 96, 96, 3), np.uint8))
    assert empty.shape == (0, 96, 96, 3)

    # a model whose graph only works for batch 1 although it declares a dynamic batch
    m = onnx.load(model.path)
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 3, 96, 96], np.int64), "one_shape"))
    m.graph.node.append(helper.make_node("Reshape", ["output", "one_shape"], ["output_b1"]))
    m.graph.output[0].name = "output_b1"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = _save(m, tmp_path / "b1.onnx")
    fragile = LipSyncModel.load(path, providers=CPU_ONLY)
    fragile.generate(*_random_inputs(1, 96))
    with pytest.raises(ModelInferenceError) as exc:
        fragile.generate(*_random_inputs(2, 96))
    assert path in str(exc.value) and "Reshape" in exc.value.cause


# --- providers ---------------------------------------------------------------------------------
def test_select_providers_only_offers_gpu_for_a_real_device(caplog):
    """Passes on CPU-only and GPU machines alike: asserts what this machine should pick."""
    import onnxruntime as ort

    assert select_providers([], Settings()) == [CPU]  # no GPU assigned
    names = [provider_name(p) for p in select_providers(settings=Settings())]
    assert names[-1] == CPU
    real_gpu = cuda_device_count() > 0 and CUDA in ort.get_available_providers()
    assert (CUDA in names) == real_gpu
    if not real_gpu:  # a Ray logical GPU id does not make a GPU appear
        assert select_providers(gpu_ids=[0], settings=Settings()) == [CPU]
    assert TENSORRT not in names  # never by default
    with caplog.at_level(logging.INFO, logger="lipsync.models"):
        select_providers([], Settings())
    assert not caplog.records  # the choice is logged once per process


# --- built-in model ----------------------------------------------------------------------------
SR = 16000


def wav2lip_mel(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's audio.melspectrogram, written with librosa as the reference repo does."""
    import librosa
    from scipy import signal

    emphasised = signal.lfilter([1, -0.97], [1], wav)
    spec = np.abs(librosa.stft(y=emphasised, n_fft=800, hop_length=200, win_length=800))
    mel = librosa.filters.mel(sr=SR, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ spec
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4).astype(np.float32)


def vowel(formants, rms_dbfs: float, seconds: float = 0.4, f0: float = 120.0) -> np.ndarray:
    """A buzz source through formant resonators, at a given RMS level."""
    from scipy import signal

    t = np.arange(int(SR * seconds)) / SR
    y = signal.sawtooth(2 * np.pi * f0 * t)
    for f, bw in formants:
        r, th = np.exp(-np.pi * bw / SR), 2 * np.pi * f / SR
        y = signal.lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], y)
    return y / np.sqrt(np.mean(y ** 2)) * 10 ** (rms_dbfs / 20)


VOWEL_A = [(730, 90), (1090, 110), (2440, 170)]
VOWEL_U = [(300, 60), (870, 80), (2240, 150)]
VOWEL_O = [(570, 80), (840, 90), (2410, 150)]
VOWEL_I = [(300, 60), (2250, 100), (3000, 150)]
VOWEL_E = [(530, 80), (1840, 100), (2480, 150)]


def mel_window(wav: np.ndarray) -> np.ndarray:
    """The model input [1,1,80,16] of a frame in the middle of `wav`."""
    mel = wav2lip_mel(wav)
    start = mel.shape[1] // 2 - 8
    return mel[None, None, :, start:start + 16]


# skimage's astronaut photograph, 5 landmarks as MTCNN finds them (left eye, right eye, nose,
# left / right mouth corner)
ASTRONAUT_LANDMARKS = np.array([[203.3, 101.2], [247.6, 103.5], [223.4, 128.7], [200.3, 139.7], [245.7, 143.0]],
                               np.float32)


def real_crop(size: int) -> np.ndarray:
    import skimage.data

    image = np.ascontiguousarray(skimage.data.astronaut()[:, :, ::-1])
    matrix, _ = cv2.estimateAffinePartial2D(ASTRONAUT_LANDMARKS, canonical.canonical_points(size), method=cv2.LMEDS)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA if size < 100 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def region_masks(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inside JAW_REGION, outside it) at pixel centres of an S x S crop: the region the
    built-in model may change."""
    cx, cy, rx, ry = canonical.JAW_REGION
    c = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(c, c)
    rho2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return rho2 < 1, rho2 >= 1


@pytest.fixture(scope="module")
def builtin_settings(tmp_path_factory):
    return Settings(storage_root=tmp_path_factory.mktemp("storage"))


@pytest.fixture(scope="module")
def builtin256(builtin_settings):
    return load_model("builtin", builtin_settings, providers=CPU_ONLY)


def test_builtin_graph_is_valid_onnx_with_the_wav2lip_contract():
    for size in (96, 256):
        model = build_builtin_model(size)
        onnx.checker.check_model(model, full_check=True)
        assert model.ir_version == 10
        assert {o.domain: o.version for o in model.opset_import}[""] >= 16
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert inputs == {"mel_spectrogram": ["batch", 1, 80, 16], "video_frames": ["batch", 6, size, size]}
        out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
        assert out_dims == ["batch", 3, size, size]
    assert build_builtin_model(96).SerializeToString() == build_builtin_model(96).SerializeToString()


def test_builtin_graph_on_the_region_box_equals_the_graph_on_the_whole_crop():
    """The graph warps, shades and blends only the box around JAW_REGION and copies the rest;
    the output is the same, bit for bit, as running those steps on the whole crop, for speech,
    silence and out-of-range face values alike."""
    rng = np.random.default_rng(7)
    for size in (96, 256):
        box, whole = (ort.InferenceSession(build_builtin_model(size, whole_crop=w).SerializeToString(),
                                           providers=["CPUExecutionProvider"]) for w in (False, True))
        r0, r1, c0, c1 = builtin_mod.region_box(builtin_mod.warp_fields(size)["blend"])
        assert 0 < r0 < r1 < size and 0 < c0 < c1 < size and (r1 - r0) * (c1 - c0) < 0.2 * size * size
        crop = real_crop(size)
        faces = np.concatenate([np.repeat(crop.transpose(2, 0, 1)[None] / 255.0, 2, axis=1),
                                rng.uniform(-0.2, 1.2, (3, 6, size, size))]).astype(np.float32)
        mels = np.concatenate([mel_window(vowel(VOWEL_A, -18)), np.full((1, 1, 80, 16), -4.0, np.float32),
                               rng.uniform(-4, 2, (2, 1, 80, 16)).astype(np.float32)])
        feeds = {"mel_spectrogram": mels, "video_frames": faces}
        out_box, out_whole = box.run(None, feeds)[0], whole.run(None, feeds)[0]
        assert np.array_equal(out_box, out_whole)
        assert not np.array_equal(out_box[0], faces[0, 3:])  # the loud vowel did change the crop


def test_builtin_file_is_cached_and_reused(builtin_settings, builtin256):
    path = builtin_model_path(builtin_settings)
    assert str(path) == builtin256.path
    assert path.parent == builtin_settings.dir("models")
    assert builtin_mod.generator_fingerprint(256) in path.name
    before = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert builtin_model_path(builtin_settings) == path
    assert path.stat().st_mtime_ns == before
    assert onnx.load(str(path)).SerializeToString() == build_builtin_model(256).SerializeToString()
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []
    assert builtin_model_path(builtin_settings, size=96) != path


def test_builtin_silence_returns_the_reference(builtin_settings, builtin256):
    small = load_model("builtin:96", builtin_settings, providers=CPU_ONLY)
    assert small.size == 96 and small.batch_fixed is None and builtin256.size == 256
    for model in (builtin256, small):
        crop = real_crop(model.size)
        crops = np.stack([crop, crop[:, ::-1].copy()])
        silence = np.full((2, 1, 80, 16), -4.0, np.float32)
        out = model.generate(silence, crops)
        assert np.abs(out.astype(int) - crops.astype(int)).max() <= 1
        # digital silence in a real window is silence too
        quiet = mel_window(np.zeros(SR // 2))
        assert np.abs(model.generate(quiet, crops[:1]).astype(int) - crops[:1].astype(int)).max() <= 1


def test_builtin_opening_grows_with_energy_and_stays_in_the_mouth_region(builtin256):
    size = builtin256.size
    crop = real_crop(size)
    levels = [-60, -45, -35, -28, -20]
    mels = np.concatenate([mel_window(vowel(VOWEL_A, db)) for db in levels])
    out = builtin256.generate(mels, np.repeat(crop[None], len(levels), axis=0))
    inside, outside = region_masks(size)
    diff = np.abs(out.astype(np.int16) - crop.astype(np.int16))
    change = diff.max(axis=3)[:, inside].mean(axis=1)
    assert np.all(np.diff(change) > 0), change
    assert change[0] < 0.5  # a -60 dBFS murmur barely moves the mouth
    assert not diff[:, outside].any()  # nothing outside JAW_REGION changes, bit for bit
    # the loud vowel opens a dark gap several pixels high at the mouth centre
    mx, my = (int(v * size) for v in canonical.MOUTH_CENTER)
    column = out[-1, :, mx - 3:mx + 4].astype(np.int16).mean(axis=(1, 2))
    reference = crop[:, mx - 3:mx + 4].astype(np.int16).mean(axis=(1, 2))
    darker_rows = np.flatnonzero(reference - column > 40)
    assert darker_rows.size >= 6, darker_rows
    assert abs(darker_rows.mean() - my) < 0.08 * size  # ... between the lips


def test_builtin_jaw_drops_and_the_lips_part_around_a_dark_inside(builtin256):
    """At full opening the chin moves down with the lower lip (by about JAW_DROP * S), the upper
    lip lifts, so the opening lies on both sides of the lip line, and the inside of the mouth is
    darkest half-way between the lips (the back of the mouth), lighter towards either lip."""
    size = builtin256.size
    crop = real_crop(size)
    out = builtin256.generate(mel_window(vowel(VOWEL_A, -18)), crop[None])[0]
    mx, my = (int(v * size) for v in canonical.MOUTH_CENTER)
    grey = lambda img: cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, mx - 4:mx + 5].astype(np.float64).mean(axis=1)  # noqa: E731
    g_out, g_ref = grey(out), grey(crop)
    # the chin (rows 0.80-0.88 of S): the best vertical shift of the template onto the output
    rows = np.arange(int(0.80 * size), int(0.88 * size))
    errors = {d: np.abs(g_out[rows] - g_ref[rows - d]).mean() for d in range(0, 16)}
    drop = min(errors, key=errors.get)
    assert abs(drop - builtin_mod.JAW_DROP * size) <= 3 and errors[drop] < 0.5 * errors[0], (drop, errors)
    # the opening: darker than the template, above and below the lip line
    gap = np.flatnonzero(g_ref - g_out > 40)
    assert gap.size >= 10 and gap.min() < my < gap.max(), (gap, my)
    third = gap.size // 3
    middle, edges = g_out[gap[third:-third]].mean(), np.r_[g_out[gap[:2]], g_out[gap[-2:]]].mean()
    assert middle < edges - 5, (middle, edges)


def test_builtin_mouth_shape_differs_by_vowel(builtin256):
    """Rounded vowels (/o/, /u/) open a narrow, round mouth, spread ones (/i/, /e/) a wide, flat
    one: the opening's width / height (`cluster.quality.opening_shape`) of every spread vowel is
    over 1.5 times that of every rounded one, and /a/ lies between."""
    from cluster.quality import opening_shape

    crop = real_crop(builtin256.size)
    vowels = {"a": VOWEL_A, "o": VOWEL_O, "u": VOWEL_U, "i": VOWEL_I, "e": VOWEL_E}
    mels = np.concatenate([mel_window(vowel(f, -20)) for f in vowels.values()])
    crops = np.repeat(crop[None], len(vowels), axis=0)
    out = builtin256.generate(mels, crops)
    identity = np.repeat(np.array([[1, 0, 0], [0, 1, 0]], np.float32)[None], len(vowels), axis=0)
    shape = opening_shape(out, crops, identity, builtin256.size)
    ratio = dict(zip(vowels, shape[:, 0] / shape[:, 1]))
    assert np.all(shape[:, 1] >= 3), shape  # every one of them opens the mouth (/i/ least: a slit)
    rounded, spread = max(ratio["o"], ratio["u"]), min(ratio["i"], ratio["e"])
    assert spread > 1.5 * rounded, ratio
    assert rounded < ratio["a"] < spread, ratio


def test_builtin_bright_vowels_spread_the_lips(builtin256):
    size = builtin256.size
    crop = real_crop(size)
    centres = builtin_mod.mel_bin_centres()
    mels = np.full((2, 1, 80, 16), -4.0, np.float32)
    mels[:, :, (centres >= 300) & (centres < 1700)] = 0.5  # loud from 300 Hz up (neither is rounded) ...
    mels[0, :, (centres >= 1700) & (centres < 3000)] = 1.0  # ... F2 high (1.7-3 kHz louder): /i/, /e/-like
    mels[1, :, (centres >= 1700) & (centres < 3000)] = -0.5  # ... F2 low (1-1.7 kHz louder): /a/-like, neutral
    out = builtin256.generate(mels, np.stack([crop, crop])).astype(np.int16)
    dark = (crop.astype(np.int16) - out).min(axis=3) > 40
    widths = [np.flatnonzero(d.any(axis=0)).size for d in dark]
    assert widths[0] > widths[1], widths  # the bright spectrum opens wider (spread lips)


def test_builtin_reads_the_frames_own_columns(builtin256):
    """Sound later in the window must not open the mouth: sound after the next ~40 ms (columns
    from READ_COLUMNS on, which a live session renders without) changes nothing at all, and sound
    in the next ~40 ms over a quiet frame only closes the lips (a closure before a syllable), never
    opens them."""
    from cluster.quality import opening_shape

    crop = real_crop(builtin256.size)[None]
    loud = mel_window(vowel(VOWEL_A, -20))
    late = np.full_like(loud, -4.0)
    late[..., builtin_mod.READ_COLUMNS:] = loud[..., builtin_mod.READ_COLUMNS:]  # what a live session may not have yet
    next_40ms = np.full_like(loud, -4.0)
    next_40ms[..., 3:] = loud[..., 3:]
    early = np.full_like(loud, -4.0)
    early[..., :3] = loud[..., :3]
    assert np.array_equal(builtin256.generate(late, crop), crop)
    pressed = builtin256.generate(next_40ms, crop)
    assert not np.array_equal(pressed, crop)
    identity = np.array([[[1, 0, 0], [0, 1, 0]]], np.float32)
    closed_h = opening_shape(pressed, crop, identity, builtin256.size)[0, 1]
    open_h = opening_shape(builtin256.generate(early, crop), crop, identity, builtin256.size)[0, 1]
    assert np.nan_to_num(closed_h) <= SEAM_MAX_HEIGHT < open_h, (closed_h, open_h)


SEAM_MAX_HEIGHT = 4
"""Pixels (S=256): the dark line where closed lips meet is at most this high; an opening is more."""


def _vertical_shift(out_grey: np.ndarray, ref_grey: np.ndarray, rows: np.ndarray, max_shift: int = 10) -> int:
    """The shift d (rows, + = down) of the reference that best matches the output on `rows`."""
    errors = {d: np.abs(out_grey[rows] - ref_grey[rows - d]).mean() for d in range(-max_shift, max_shift + 1)}
    return min(errors, key=errors.get)


def test_builtin_closure_presses_the_lips_together(builtin256):
    """A bilabial closure (/m b p/): the frame's own sound is quiet and a syllable starts within
    the next ~40 ms. The lips close on each other: near the lip line the upper lip moves down by
    over half of PRESS_UP * S, the lower lip up by over half of PRESS_LOW * S (the shift fades
    away from the lip line), the lip line between them darkens a little (the seam),
    and no dark opening shows. The same quiet frame before more silence is the template, bit for
    bit, and a frame with its own vowel opens the mouth instead of closing it."""
    from cluster.quality import opening_shape

    size = builtin256.size
    crop = real_crop(size)
    rng = np.random.default_rng(1)
    floor = rng.normal(0.0, 1e-4, SR // 2)  # about -80 dBFS: a pause
    speech = np.concatenate([floor, vowel(VOWEL_A, -20, seconds=0.3)])
    mel = wav2lip_mel(speech)
    onset = int(0.5 * 80)  # mel column of the syllable's start
    mels = np.stack([mel[None, :, onset - 4:onset + 12],    # 50 ms before the onset: the closure
                     mel[None, :, onset - 20:onset - 4],    # 250 ms before it: still the pause
                     mel[None, :, onset + 8:onset + 24]])   # 100 ms into the vowel
    out = builtin256.generate(mels.astype(np.float32), np.repeat(crop[None], 3, axis=0))
    mx, my = (int(v * size) for v in canonical.MOUTH_CENTER)
    grey = lambda img: cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, mx - 4:mx + 5].astype(np.float64).mean(axis=1)  # noqa: E731
    g_ref, g_press = grey(crop), grey(out[0])
    up = _vertical_shift(g_press, g_ref, np.arange(my - 8, my - 2))
    low = _vertical_shift(g_press, g_ref, np.arange(my + 3, my + 9))
    print(f"\n[builtin] closure: upper lip moves {up:+d} px, lower lip {low:+d} px (S={size})")
    assert builtin_mod.PRESS_UP * size / 2 <= up <= builtin_mod.PRESS_UP * size + 1, up
    assert builtin_mod.PRESS_LOW * size / 2 <= -low <= builtin_mod.PRESS_LOW * size + 1, low
    assert g_press[my - 1:my + 2].mean() < g_ref[my - 1:my + 2].mean()  # the seam
    identity = np.repeat(np.array([[[1, 0, 0], [0, 1, 0]]], np.float32), 3, axis=0)
    shape = opening_shape(out, np.repeat(crop[None], 3, axis=0), identity, size)
    assert np.nan_to_num(shape[0, 1]) <= SEAM_MAX_HEIGHT < shape[2, 1], shape
    assert np.array_equal(out[1], crop)
    # the closure is what moves the lips: without the syllable ahead the frame is the template
    assert not np.array_equal(out[0], crop)


def test_builtin_rounded_vowel_opens_narrower(builtin256):
    size = builtin256.size
    crop = real_crop(size)
    centres = builtin_mod.mel_bin_centres()
    mels = np.full((2, 1, 80, 16), -4.0, np.float32)
    mels[:, :, centres < 1000] = 1.0          # both: loud, fully open
    mels[0, :, centres >= 1000] = 0.2         # flat spectrum: /a/-like
    mels[1, :, centres >= 1000] = -1.5        # energy below 1 kHz only: /u/-like
    out = builtin256.generate(mels, np.stack([crop, crop])).astype(np.int16)
    dark = (crop.astype(np.int16) - out).min(axis=3) > 40
    widths = [np.flatnonzero(d.any(axis=0)).size for d in dark]
    assert widths[1] < 0.9 * widths[0], widths
    # and real vowels: /u/ is judged rounded, /a/ is not
    real = builtin256.generate(np.concatenate([mel_window(vowel(VOWEL_A, -20)), mel_window(vowel(VOWEL_U, -20))]),
                               np.stack([crop, crop])).astype(np.int16)
    real_dark = (crop.astype(np.int16) - real).min(axis=3) > 40
    real_widths = [np.flatnonzero(d.any(axis=0)).size for d in real_dark]
    assert real_widths[1] < real_widths[0], real_widths


def test_builtin_rounded_vowel_covers_a_smiles_teeth_with_the_lips(builtin256):
    """On a template smiling with its teeth (the renderer's crop of the astronaut), /u/ and /o/ move
    the lips over the teeth around a small dark opening: at most 30 % of the template's teeth pixels
    (bright and unsaturated) still show, under half of what /a/ leaves (its upper teeth hang under the
    lifted upper lip). Before the lips covered them, /u/ left 58 % showing between stretched lips."""
    from cluster.faces.align import alignment_matrices, cut_crops
    from cluster.quality import opening_shape
    from cluster.synth import textured_face

    size = builtin256.size
    frame, landmarks = textured_face((640, 480), seed=1)
    crop = cut_crops(frame[None], alignment_matrices(landmarks[None], size), size)[0]
    mx, my = (int(v * size) for v in canonical.MOUTH_CENTER)
    mels = np.concatenate([mel_window(vowel(VOWEL_A, -18)), mel_window(vowel(VOWEL_U, -18)),
                           mel_window(vowel(VOWEL_O, -18))])
    crops = np.repeat(crop[None], 3, axis=0)
    out = builtin256.generate(mels, crops)

    def teeth_pixels(img: np.ndarray) -> int:
        box = img[my - 16:my + 10, mx - 32:mx + 33].astype(np.float64) / 255.0
        return int((box.mean(axis=2) - 3.0 * (box.max(axis=2) - box.min(axis=2)) > 0.3).sum())

    shown = [teeth_pixels(o) for o in out]
    identity = np.repeat(np.array([[[1, 0, 0], [0, 1, 0]]], np.float32), 3, axis=0)
    shape = opening_shape(out, crops, identity, size)
    template_teeth = teeth_pixels(crop)
    print(f"\n[builtin] teeth pixels: template {template_teeth}, /a/ {shown[0]}, /u/ {shown[1]}, /o/ {shown[2]}; "
          f"openings (w, h) {shape.tolist()}")
    assert template_teeth > 150, template_teeth
    for rounded in shown[1:]:
        assert rounded <= 0.3 * template_teeth and rounded < 0.5 * shown[0], shown
    assert np.all(shape[1:, 1] >= 6) and np.all(shape[1:, 0] < 0.75 * shape[0, 0]), shape  # a small round hole


def closed_mouth_crop(size: int) -> np.ndarray:
    """`real_crop` of the astronaut photo with its smile closed (`cluster.synth.close_mouth`): a
    template whose mouth is closed, its lip line (the seam) a few pixels above the canonical one."""
    import skimage.data

    from cluster.synth import close_mouth

    image = close_mouth(np.ascontiguousarray(skimage.data.astronaut()[:, :, ::-1]))
    matrix, _ = cv2.estimateAffinePartial2D(ASTRONAUT_LANDMARKS, canonical.canonical_points(size), method=cv2.LMEDS)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def test_builtin_opens_a_closed_mouth_at_its_own_lip_line(builtin256):
    """On a template whose mouth is closed, speech opens the mouth where the lips meet (the seam,
    found by the graph) rather than at the canonical lip line; the opening is darkest at its centre
    (the back of the mouth) and lighter towards its corners, with a lighter band of upper teeth under
    the upper lip at full opening; a rounded vowel opens a much narrower hole; silence is the
    template, bit for bit."""
    from cluster.quality import opening_shape

    size = builtin256.size
    crop = closed_mouth_crop(size)
    mx, my = (int(v * size) for v in canonical.MOUTH_CENTER)
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)[:, mx - 8:mx + 9].astype(np.float64).mean(axis=1)
    seam = my - 16 + int(np.argmin(grey[my - 16:my + 8]))
    assert seam <= my - 4, (seam, my)  # the template's lip line lies above the canonical one
    mels = np.concatenate([mel_window(vowel(VOWEL_A, -18)), mel_window(vowel(VOWEL_U, -18)),
                           np.full((1, 1, 80, 16), -4.0, np.float32)])
    crops = np.repeat(crop[None], 3, axis=0)
    out = builtin256.generate(mels, crops)
    assert np.array_equal(out[2], crop)
    identity = np.repeat(np.array([[[1, 0, 0], [0, 1, 0]]], np.float32), 3, axis=0)
    shape = opening_shape(out, crops, identity, size)
    assert shape[0, 1] >= 6 and shape[1, 1] >= 4, shape
    assert shape[1, 0] < 0.6 * shape[0, 0], shape  # /u/: a small round hole between pursed lips
    g_out = cv2.cvtColor(out[0], cv2.COLOR_BGR2GRAY).astype(np.float64)
    g_ref = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float64)
    column = g_out[:, mx - 2:mx + 3].mean(axis=1)
    gap = np.flatnonzero(g_ref[:, mx - 2:mx + 3].mean(axis=1) - column > 30)
    print(f"\n[builtin] closed mouth: seam row {seam}, canonical lip row {my}, opened rows {gap.min()}-{gap.max()}, "
          f"shapes (w, h) /a/ {shape[0].tolist()}, /u/ {shape[1].tolist()}")
    assert gap.min() <= seam + 1 and gap.max() >= seam + 3, (gap, seam)
    assert abs(0.5 * (gap.min() + gap.max()) - seam) < abs(0.5 * (gap.min() + gap.max()) - my), (gap, seam, my)
    deepest = column[gap].min()
    teeth = column[gap[:max(2, gap.size // 3)]].max()  # the upper third of the opening
    assert teeth > deepest + 60, (teeth, deepest)
    # darker at the centre than towards the corners (at 60 % of the opening's half-width)
    dark = (g_ref - g_out > 30) & (g_out < 0.55 * np.median(g_ref))
    cols = np.flatnonzero(dark.any(axis=0))
    half = 0.5 * (cols.max() - cols.min())
    side = [int(round(0.5 * (cols.min() + cols.max()) + k * 0.6 * half)) for k in (-1, 1)]
    side_grey = np.mean([g_out[dark[:, c], c].mean() for c in side])
    assert g_out[dark[:, mx], mx].min() < side_grey - 15, (g_out[dark[:, mx], mx], side_grey)


def test_builtin_is_deterministic_and_fast(builtin256):
    rng = np.random.default_rng(3)
    mels = rng.uniform(-4, 2, (16, 1, 80, 16)).astype(np.float32)
    crops = np.repeat(real_crop(256)[None], 16, axis=0)
    first = builtin256.generate(mels, crops)
    t0 = time.perf_counter()
    second = builtin256.generate(mels, crops)
    elapsed = time.perf_counter() - t0
    assert np.array_equal(first, second)
    assert elapsed < 1.0, f"a batch of 16 at S=256 took {elapsed:.2f} s"


def test_load_model_defaults_to_settings_model(tmp_path):
    path = wav2lip_like(tmp_path / "custom.onnx", "audio_sequences", "face_sequences", "output", 96, batch=1)
    model = load_model(settings=Settings(storage_root=tmp_path / "s", model=path), providers=CPU_ONLY)
    assert model.path == path and model.batch_fixed == 1
    assert active_providers(model._session) == CPU_ONLY


# --- GPU execution, with injected device facts --------------------------------------------------
GPU_BOX = DeviceFacts(available=(TENSORRT, CUDA, CPU), cuda_devices=2, tensorrt_runtime=True,
                      device_memory=(80 * 2**30, 80 * 2**30))
NO_GPU_BOX = DeviceFacts(available=(TENSORRT, CUDA, CPU))  # onnxruntime-gpu on a machine without one


def test_default_is_cuda_on_the_assigned_device_and_cpu_without_one(tmp_path, monkeypatch):
    s = Settings(storage_root=tmp_path)
    assert select_providers(None, s, NO_GPU_BOX) == [CPU]
    assert select_providers([], s, GPU_BOX) == [CPU]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # Ray gave this actor GPUs 3 and 5
    assert select_providers(["3", "5"], s, GPU_BOX) == [(CUDA, {"prefer_nhwc": "1", "device_id": 0}), CPU]
    assert select_providers(["3", "5"], s, GPU_BOX, device_index=1) == \
        [(CUDA, {"prefer_nhwc": "1", "device_id": 1}), CPU]
    assert device_ordinals(["5"], visible="3,5") == [1]
    assert device_ordinals([2], visible="") == [2]  # Ray told not to set CUDA_VISIBLE_DEVICES
    assert device_ordinals(None) == [0]
    one_gpu = DeviceFacts(available=GPU_BOX.available, cuda_devices=1, device_memory=(2**30,))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert select_providers(["1"], s, one_gpu) == [CPU]  # a logical GPU beyond the real ones


def test_fractional_workers_get_a_memory_limit(tmp_path):
    half = Settings(storage_root=tmp_path, worker_gpus=0.5)
    (name, opts), cpu = select_providers([0], half, GPU_BOX)
    assert name == CUDA and cpu == CPU and opts["gpu_mem_limit"] == 40 * 2**30
    (_, opts), _ = select_providers([0], Settings(storage_root=tmp_path), GPU_BOX)
    assert "gpu_mem_limit" not in opts


def test_tensorrt_is_opt_in_with_a_cache_under_the_storage_root(tmp_path):
    s = Settings(storage_root=tmp_path, providers="tensorrt,cuda,cpu")
    chosen = select_providers([0], s, GPU_BOX)
    assert [provider_name(p) for p in chosen] == [TENSORRT, CUDA, CPU]
    trt = chosen[0][1]
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(tmp_path / "models" / "tensorrt")
    # asked for, but no libnvinfer: CUDA; no GPU at all: CPU
    no_trt = DeviceFacts(available=GPU_BOX.available, cuda_devices=1, device_memory=(2**30,))
    assert [provider_name(p) for p in select_providers([0], s, no_trt)] == [CUDA, CPU]
    assert select_providers(None, s, NO_GPU_BOX) == [CPU]
    assert select_providers([0], Settings(storage_root=tmp_path, providers="cpu"), GPU_BOX) == [CPU]
    assert parse_providers("TRT, cuda") == [TENSORRT, CUDA, CPU]
    with pytest.raises(ModelLoadError, match="LIPSYNC_PROVIDERS: unknown provider 'rocm'"):
        parse_providers("rocm,cpu")
    # and refused with the settings (a typo failed every model load, as model.load_failed)
    from pydantic import ValidationError

    from cluster.config import PROVIDER_CHOICES
    from cluster.models.providers import PROVIDER_NAMES

    assert set(PROVIDER_CHOICES) == set(PROVIDER_NAMES)
    with pytest.raises(ValidationError, match="unknown provider 'rocm'"):
        Settings(storage_root=tmp_path, providers="rocm,cpu")


def test_tensorrt_profiles_cover_batch_1_to_the_batch_size(tmp_path):
    path = wav2lip_like(tmp_path / "m.onnx", "audio_sequences", "face_sequences", "output", 96)
    c = contract_from_file(path)  # read from the file, no session
    assert (c.mel_name, c.face_name, c.size, c.batch_fixed) == ("audio_sequences", "face_sequences", 96, None)
    s = Settings(storage_root=tmp_path, providers="tensorrt,cuda,cpu")
    trt, cuda, cpu = tensorrt_profiles(select_providers([0], s, GPU_BOX), c.mel_name, c.face_name, c.size, 16)
    assert trt[1]["trt_profile_min_shapes"] == "audio_sequences:1x1x80x16,face_sequences:1x6x96x96"
    assert trt[1]["trt_profile_opt_shapes"] == trt[1]["trt_profile_max_shapes"] == \
        "audio_sequences:16x1x80x16,face_sequences:16x6x96x96"
    assert cuda == (CUDA, {"prefer_nhwc": "1", "device_id": 0}) and cpu == CPU


def test_each_model_has_its_own_tensorrt_engine_cache(tmp_path):
    """onnxruntime names a cached engine after the graph, not the weights: two models of one
    architecture (a retrained one saved under the same name) get caches of their own, by content."""
    from cluster.fsutil import file_sha256
    from cluster.models.providers import tensorrt_cache_of_model

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = wav2lip_like(tmp_path / "a" / "m.onnx", "audio_sequences", "face_sequences", "output", 96)
    b = wav2lip_like(tmp_path / "b" / "m.onnx", "audio_sequences", "face_sequences", "output", 96, seed=1)
    s = Settings(storage_root=tmp_path, providers="tensorrt,cuda,cpu")
    paths = []
    for model in (a, b):
        trt, cuda, cpu = tensorrt_cache_of_model(select_providers([0], s, GPU_BOX), file_sha256(model)[:16])
        assert trt[1]["trt_engine_cache_path"] == trt[1]["trt_timing_cache_path"]
        assert Path(trt[1]["trt_engine_cache_path"]).parent == tmp_path / "models" / "tensorrt"
        assert Path(trt[1]["trt_engine_cache_path"]).is_dir() and cuda[0] == CUDA and cpu == CPU
        paths.append(trt[1]["trt_engine_cache_path"])
    assert paths[0] != paths[1]


class _ShapeSpy:
    """Wraps an onnxruntime session and records the batch size of every run."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, names, feeds):
        self.batches.append({v.shape[0] for v in feeds.values()})
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_padded_batches_run_at_one_shape(tmp_path):
    path = wav2lip_like(tmp_path / "m.onnx", "mel_spectrogram", "video_frames", "output", 96)
    plain = LipSyncModel.load(path, providers=CPU_ONLY)
    padded = LipSyncModel.load(path, providers=CPU_ONLY, pad_batch=8)
    spy = padded._session = _ShapeSpy(padded._session)
    mel, crops = _random_inputs(21, 96)
    np.testing.assert_array_equal(padded.generate(mel, crops), plain.generate(mel, crops))
    np.testing.assert_array_equal(padded.generate(mel[:3], crops[:3]), plain.generate(mel[:3], crops[:3]))
    assert spy.batches == [{8}] * 4  # 8 + 8 + 5 padded, then 3 padded
    padded.warmup()
    assert spy.batches[-1] == {8}


def to_float16(path_in: str, path_out) -> str:
    """A float16 export of a float32 model: float16 inputs, output and weights."""
    m = onnx.load(path_in)
    for vi in [*m.graph.input, *m.graph.output]:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    for i, init in enumerate(m.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and init.name != "scales":  # Resize scales stay float32
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr.astype(np.float16), init.name))
    return _save(m, path_out)


def test_float16_export_runs_with_casts_at_the_edge(tmp_path):
    path32 = wav2lip_like(tmp_path / "m32.onnx", "mel_spectrogram", "video_frames", "output", 96, seed=4)
    m32 = LipSyncModel.load(path32, providers=CPU_ONLY)
    m16 = LipSyncModel.load(to_float16(path32, tmp_path / "m16.onnx"), providers=CPU_ONLY, pad_batch=4)
    assert (m32.precision, m16.precision) == ("float32", "float16")
    mel, crops = _random_inputs(6, 96)
    raw = m16.infer(mel, np.concatenate([crops, crops], axis=3).transpose(0, 3, 1, 2) / np.float32(255))
    assert raw.dtype == np.float32 and raw.shape == (6, 3, 96, 96)
    a, b = m32.generate(mel, crops).astype(int), m16.generate(mel, crops).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.5
    assert list_models(Settings(storage_root=tmp_path))  # the directory listing copes with it too


def test_float16_edge_conversions_equal_numpys_and_their_table_fallbacks():
    """generate's float16 input and output conversions (OpenCV, or tables where OpenCV has no
    float16 arithmetic) give exactly what numpy's scalar casts give, NaN and overflow included."""
    from cluster.models.adapter import _FLOAT16_OF_BYTE, _UINT8_OF_FLOAT16, scaled_float16, unit_to_uint8

    planes = np.random.default_rng(3).integers(0, 256, (5, 3, 96, 96), dtype=np.uint8)
    want = (planes * np.float32(1.0 / 255.0)).astype(np.float16)
    np.testing.assert_array_equal(scaled_float16(planes), want)
    np.testing.assert_array_equal(_FLOAT16_OF_BYTE[planes], want)
    out = (np.random.default_rng(4).random((5, 3, 96, 96)) * 1.4 - 0.2).astype(np.float16)
    out.flat[:6] = [np.nan, np.inf, -np.inf, 65504, -0.0, 0.5 / 255]
    with np.errstate(invalid="ignore"):
        scaled = np.nan_to_num(out.astype(np.float32) * np.float32(255), nan=0.0)
        ref = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(unit_to_uint8(out), ref)
    np.testing.assert_array_equal(_UINT8_OF_FLOAT16[out.view(np.uint16)], ref)
    assert unit_to_uint8(out).flat[0] == 0  # NaN -> 0, as the float32 path gives


def test_float32_output_conversion_and_channel_order_equal_numpys():
    """generate's float32 output conversion (OpenCV's saturating one) gives numpy's
    rint(clip(x * 255)) for every value, halves between levels, NaN (0) and infinities included, and
    the channels-last copy is numpy's transpose (and channels-first its inverse)."""
    from cluster.models.adapter import channels_first, channels_last, unit_to_uint8

    rng = np.random.default_rng(5)
    out = (rng.random((4, 3, 64, 64)) * 1.4 - 0.2).astype(np.float32)
    halves = ((np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(255)).astype(np.float32)
    out.flat[:256] = halves
    out.flat[256:256 + 256] = np.nextafter(halves, np.float32(0))
    out.flat[512:518] = [np.nan, np.inf, -np.inf, 3e38, -0.0, -3e38]
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.nan_to_num(out * np.float32(255), nan=0.0)
    ref = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    got = unit_to_uint8(out)
    np.testing.assert_array_equal(got, ref)
    assert got.flat[512] == 0
    np.testing.assert_array_equal(channels_last(got), got.transpose(0, 2, 3, 1))
    assert channels_last(got).flags.c_contiguous
    np.testing.assert_array_equal(channels_first(channels_last(got)), got)  # its inverse, for the input


def test_two_replicas_split_a_batch_and_agree(tmp_path):
    path = wav2lip_like(tmp_path / "m.onnx", "mel_spectrogram", "video_frames", "output", 96)
    one = LipSyncModel.load(path, providers=CPU_ONLY)
    pair = ReplicatedModel([LipSyncModel.load(path, providers=CPU_ONLY) for _ in range(2)], timeout_s=60)
    assert (pair.size, pair.crop, pair.providers) == (96, "wav2lip", CPU_ONLY)
    mel, crops = _random_inputs(7, 96)
    np.testing.assert_array_equal(pair.generate(mel, crops), one.generate(mel, crops))

    class Stuck:  # a replica whose device hangs: the batch fails, typed, by its deadline
        def generate(self, mel, crops):
            time.sleep(3)
            return crops

    with pytest.raises(ModelInferenceError, match="did not answer its share of a batch of 7 within 0.3 s"):
        ReplicatedModel([one, Stuck()], timeout_s=0.3).generate(mel, crops)
    # no usable GPU: one CPU session, whatever Ray assigned
    s = Settings(storage_root=tmp_path, model=path)
    assert isinstance(load_model_on_devices(path, s, ["0", "1"], NO_GPU_BOX), LipSyncModel)


# --- crop recipe ---------------------------------------------------------------------------------
def test_crop_recipe_from_metadata_size_job_and_setting(tmp_path):
    s = Settings(storage_root=tmp_path)
    p96 = wav2lip_like(tmp_path / "w96.onnx", "mel_spectrogram", "video_frames", "output", 96)
    p256 = wav2lip_like(tmp_path / "w256.onnx", "mel_spectrogram", "video_frames", "output", 256)
    m = onnx.load(p256)
    helper.set_model_props(m, {"lipsync.crop": "wav2lip"})
    tagged = _save(m, tmp_path / "tagged.onnx")
    helper.set_model_props(m, {"lipsync.crop": "tight"})
    bad = _save(m, tmp_path / "bad.onnx")

    assert LipSyncModel.load(p96, providers=CPU_ONLY).crop == "wav2lip"       # default for S=96
    assert LipSyncModel.load(p256, providers=CPU_ONLY).crop == "aligned"      # other sizes
    assert LipSyncModel.load(tagged, providers=CPU_ONLY).crop == "wav2lip"    # metadata wins
    assert load_model("builtin:96", s, providers=CPU_ONLY).crop == "aligned"  # the built-in model says so
    with pytest.raises(ModelContractError, match="lipsync.crop='tight'"):
        LipSyncModel.load(bad, providers=CPU_ONLY)
    # the same answers without a session (what prepare_job uses), and the overrides
    assert [crop_for_spec(p, None, s) for p in (p96, p256, tagged, "builtin")] == \
        ["wav2lip", "aligned", "wav2lip", "aligned"]
    assert crop_for_spec(p96, "aligned", s) == "aligned"
    assert crop_for_spec(p96, None, Settings(storage_root=tmp_path, crop="aligned")) == "aligned"
    m96 = LipSyncModel.load(p96, providers=CPU_ONLY)
    assert crop_recipe(m96, None, s) == "wav2lip" and crop_recipe(m96, "aligned", s) == "aligned"


def test_lipsync_models_lists_the_model_directory(tmp_path):
    import subprocess
    import sys

    s = Settings(storage_root=tmp_path)
    wav2lip_like(s.dir("models") / "wav2lip_96.onnx", "audio_sequences", "face_sequences", "output", 96)
    (s.dir("models") / "broken.onnx").write_bytes(b"not onnx")
    env = {**__import__("os").environ, "LIPSYNC_STORAGE_ROOT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "models"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    expected_device = provider_name(select_providers(None, s)[0]).replace("ExecutionProvider", "")
    assert any(ln.strip().startswith("builtin: S=256 batch=dynamic crop=aligned (metadata) float32") for ln in lines)
    w96 = next(ln for ln in lines if "wav2lip_96.onnx" in ln)
    assert "S=96" in w96 and "crop=wav2lip (default for S=96)" in w96 and f"device={expected_device}" in w96
    assert "cannot load" in next(ln for ln in lines if "broken.onnx" in ln)
    assert not any("builtin-s" in ln for ln in lines)  # generated built-in files are not listed


def test_a_96_export_renders_with_the_wav2lip_crop(tmp_path, astronaut_video, speech_wav):
    """End to end with an identity-contract S=96 export: the job's plan takes the model's crop
    (wav2lip), a job may ask for the other, and the rendered video is the template."""
    from cluster.config import get_settings
    from cluster.render import admit, prepare_job, render_local
    from cluster.schemas import RenderRequest
    from tests.helpers import decode_all

    s = get_settings()  # the session's storage: the avatar is prepared once for every test
    identity = channel_picker(tmp_path / "identity96.onnx", 96, 3)
    model = LipSyncModel.load(identity, providers=CPU_ONLY)
    req = RenderRequest(audio=speech_wav, video=astronaut_video, model=identity, output=str(tmp_path / "out.mp4"))
    plan = prepare_job("j1", admit("j1", req, s), s, model_size=96)
    assert plan.crop == "wav2lip"
    aligned = req.model_copy(update={"crop": "aligned"})
    assert prepare_job("j2", admit("j2", aligned, s), s, model_size=96).crop == "aligned"
    render_local(req, s, model=model)
    out, template = decode_all(str(tmp_path / "out.mp4")), decode_all(astronaut_video)
    k = min(len(template), len(out))
    assert np.abs(out[:k].astype(int) - template[:k]).mean() < 2.0


def test_a_gpu_the_user_named_and_did_not_get_is_a_warning(tmp_path, caplog):
    """`LIPSYNC_PROVIDERS=cuda` on a machine without a usable GPU ran every model on the CPU with an INFO
    line only; the fallback stays (a node without its GPU still renders), said as a WARNING. Without
    the setting (CUDA when a device exists) it stays INFO."""
    import logging

    import cluster.models.providers as providers

    providers._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger="lipsync.models"):
        assert select_providers(None, Settings(storage_root=tmp_path, providers="cuda"), NO_GPU_BOX) == [CPU]
        assert select_providers(None, Settings(storage_root=tmp_path), NO_GPU_BOX) == [CPU]
    levels = [(r.levelname, "asked for a GPU" in r.getMessage()) for r in caplog.records
              if "onnxruntime providers" in r.getMessage()]
    assert levels == [("WARNING", True), ("INFO", False)], levels


def test_a_named_model_of_a_size_that_cannot_work_is_refused_at_admission():
    """`builtin:10`, `builtin:999` and `latency:5:16` were admitted (202) and failed later as
    `model.load_failed`, a code documented as passing; a built-in size whose mouth warp folds too."""
    from cluster.config import Settings
    from cluster.errors import InputError
    from cluster.render import check_model

    settings = Settings()
    for spec, said in (("builtin:10", "must be 32-511 pixels, got 10"), ("builtin:999", "got 999"),
                       ("builtin:319", "folds at a crop size of 319 pixels: choose another (the nearest that "
                                       "work: 318 or 320)"),
                       ("latency:5:16", "must be 32-999 pixels, got 16"), ("latency:5:99999", "got 99999"),
                       ("builtin:1000", "must be 32-511 pixels, got 1000")):
        with pytest.raises(InputError, match=re.escape(said)) as info:
            check_model(spec, settings)
        assert info.value.code == "input.invalid" and info.value.path == "model"
    for spec in ("builtin", "builtin:96", "builtin:384", "builtin:448", "latency:5", "latency:5:96"):
        check_model(spec, settings)


def test_a_service_default_model_that_cannot_work_is_the_operators_error_not_the_requests(tmp_path):
    """A joined service checks no LIPSYNC_MODEL at its start: with `builtin:10` there, every job that named no
    model was answered `input.invalid` on the field `model` (HTTP 422), a field the client never sent. It is
    the service's `model.load_failed` (HTTP 500) naming LIPSYNC_MODEL; a job that names it is still refused."""
    from cluster.config import Settings
    from cluster.errors import InputError, ModelLoadError
    from cluster.render import check_inputs
    from cluster.schemas import RenderRequest
    from service.errors import http_status

    settings = Settings(storage_root=tmp_path, model="builtin:10")
    with pytest.raises(ModelLoadError) as default:
        check_inputs(RenderRequest(audio="/srv/a.wav", video="/srv/v.mp4"), settings)
    assert "LIPSYNC_MODEL='builtin:10'" in default.value.message and http_status(default.value) == 500
    with pytest.raises(InputError) as named:
        check_inputs(RenderRequest(audio="/srv/a.wav", video="/srv/v.mp4", model="builtin:10"), settings)
    assert named.value.path == "model" and http_status(named.value) == 422


def test_a_job_planned_with_another_versions_builtin_model_renders_with_it(tmp_path, speech_wav, astronaut_video):
    """An upgrade probe: a job planned by one version and resumed by the next rendered its first 86 s with the old
    built-in model and the rest with the new one (another mouth from one chunk on), and read `succeeded`. The plan
    names the built-in model's file it was planned with; a resumed job whose file is not this version's renders
    with that file while it exists (and with this version's, said in the log, once it is gone)."""
    from cluster.render import admit, prepare_job, with_planned_model
    from cluster.schemas import RenderRequest

    s = Settings(storage_root=tmp_path / "store")
    model = load_model("builtin", s, providers=CPU_ONLY)
    plan = prepare_job("p", admit("p", RenderRequest(audio=speech_wav, video=astronaut_video), s), s,
                       model_size=model.size)
    assert plan.model == "builtin" and plan.model_file == str(builtin_model_path(s))
    assert with_planned_model(plan, s) is plan  # this version's: as planned

    # another version's built-in model, standing in: one that gives the reference crop back (this one moves it)
    older = Path(channel_picker(s.dir("models") / "builtin-s256-0123456789abcdef.onnx", 256, 3))
    resumed = with_planned_model(plan.model_copy(update={"model_file": str(older)}), s)
    assert resumed.model == str(older)
    pinned = load_model(resumed.model, s, providers=CPU_ONLY)  # what a model worker loads for that spec
    mel = np.concatenate([mel_window(vowel(VOWEL_A, -18))] * 2)
    crops = np.repeat(real_crop(256)[None], 2, axis=0)
    assert np.array_equal(pinned.generate(mel, crops), crops)  # the pinned file's answer...
    assert not np.array_equal(model.generate(mel, crops), crops)  # ...not this version's
    older.unlink()
    assert with_planned_model(plan.model_copy(update={"model_file": str(older)}), s).model == "builtin"
