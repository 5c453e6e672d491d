"""The one place for configuration: pydantic settings read from `LIPSYNC_*` env variables."""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Literal, Mapping

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# x264's presets, fastest first (what libx264 and ffmpeg's -preset take)
X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                     "placebo"]


#: What LIPSYNC_PROVIDERS may name (`cluster.models.providers.PROVIDER_NAMES` maps them to onnxruntime's)
PROVIDER_CHOICES = ("cpu", "cuda", "tensorrt", "trt")


def absolute_path(value: str) -> str:
    """`value` (a path, `~` expanded) made absolute against this process's directory."""
    return str(Path(value).expanduser().absolute())


def _default_storage_root() -> Path:
    return Path.home() / ".cache" / "lipsync-cluster"


class Settings(BaseSettings):
    """Every tunable of the product. Env: `LIPSYNC_<FIELD>` (e.g. `LIPSYNC_STORAGE_ROOT`)."""

    # (no infinite or NaN number: `inf` passed every bound, a limit of no limit, where a setting has one)
    model_config = SettingsConfigDict(env_prefix="LIPSYNC_", extra="ignore", allow_inf_nan=False)

    # --- where things live -------------------------------------------------------------
    storage_root: Path = Field(default_factory=_default_storage_root,
                               description="inputs, avatars, segments, outputs, the job database")
    input_roots: str = Field("", description="':'-separated directories path inputs may be read from")
    api_token: SecretStr | None = Field(None, description="the bearer token every API call must carry (and the key "
                                        "watch URLs are signed with); unset: no authentication (loopback and trusted "
                                        "networks only)")
    # the key of callbacks' signatures (X-Lipsync-Signature): a secret of their own, so that a
    # receiver that verifies them never holds the API token; unset: the API token (as before)
    callback_secret: SecretStr | None = Field(None, description="the key of callbacks' signatures "
                                              "(X-Lipsync-Signature); unset: the API token")

    model: str = Field("builtin", description="'builtin' or a path to a Wav2Lip-class .onnx file")
    ffmpeg: str | None = Field(None, description="ffmpeg binary; else `ffmpeg` on PATH; else imageio-ffmpeg's")
    log_format: str = Field("text", pattern="^(text|json)$",
                            description="json: one JSON object per log line with job id, chunk, actor, node")
    manager_resource: str = Field("", description="a Ray custom resource the job manager (and the Serve "
                                  "ingress) requires, e.g. lipsync_head on KubeRay's head; empty: none")

    # --- rendering ------------------------------------------------------------------------
    denoise_model_input: bool = Field(True, description="take a room loud enough to move the mouth (a fan, a "
                                      "phone's own noise) out of what the model hears, measured between the words "
                                      "(the output's audio is unchanged); a clean recording's model input is as it "
                                      "was")
    chunk_seconds: float = Field(2.0, gt=0.1, le=60, description="output seconds per chunk: the unit a compositor "
                                 "renders, retries and writes as one H.264 segment")
    first_chunk_seconds: float = Field(0.25, ge=0, le=60, description="length of a job's first chunk, so its "
                                       "first segment is ready sooner (0 or >= chunk_seconds: as the others)")
    batch_size: int = Field(16, ge=1, le=512, description="frames per model batch")
    batches_in_flight: int = Field(1, ge=1, le=8, description="model batches a compositor keeps submitted "
                                   "while it prepares the next one (each holds its frames: ~21 MiB at 720p)")
    chunks_per_compositor: int = Field(1, ge=1, le=4, description="chunks a compositor renders at once, each on "
                                       "its own thread: 2 lets a chunk start while the last one's encoder "
                                       "finishes its frames (and holds a second chunk's frames and encoder)")
    gop_frames: int = Field(10, ge=1, le=250, description="GOP length of normalised templates")
    # x264 superfast at CRF 18 against veryfast at CRF 16 on 720p (docs/PERFORMANCE.md): 27 % less
    # encoder CPU, +0.7 dB PSNR, +26 % bytes
    crf: int = Field(18, ge=0, le=51, description="x264 constant rate factor of rendered video (lower: better, "
                     "bigger); a request's crf overrides it")
    preset: X264Preset = Field("superfast", description="x264 preset of rendered video")
    video_encoder: Literal["libx264", "h264_nvenc"] = Field("libx264", description="libx264, or h264_nvenc where "
                                                            "the ffmpeg has it")
    encode_in_process: bool = Field(True, description="libx264 segments encoded in the compositor's process "
                                    "(PyAV's libx264, on a thread of its own; about 90 ms of CPU less per 50-frame "
                                    "720p segment than starting an ffmpeg); false: an ffmpeg child per segment, "
                                    "as h264_nvenc always is")
    audio_bitrate: str = Field("160k", description="AAC bitrate of the output's audio, 8k-512k (bits a second, or "
                               "k for thousands); AAC caps it at low sample rates: 16 kHz mono speech comes out "
                               "at 64 kb/s")
    keep_segments: bool = Field(False, description="keep a job's segments after it ends (its output verified, or "
                                "it failed or was cancelled)")

    # --- limits ---------------------------------------------------------------------------
    max_input_seconds: float = Field(3 * 3600.0, gt=0, description="longest speech audio, and longest template "
                                     "video, accepted (input.too_long beyond)")
    max_width: int = Field(4096, ge=16, description="widest template accepted (input.too_large beyond)")
    max_height: int = Field(4096, ge=16, description="tallest template accepted (input.too_large beyond)")
    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description="largest input file (an upload, a URL's download, a "
                                  "path) accepted (input.too_large beyond)")
    disk_reserve_bytes: int = Field(64 * 1024**2, ge=0,
                                    description="free space a job must leave on the storage root's "
                                    "filesystem beyond its estimated needs (resource.disk otherwise)")
    simulate_free_bytes: int | None = Field(None, ge=0,
                                            description="drills and tests: the free space the disk "
                                            "check sees instead of asking the filesystem")
    detect_interval: int = Field(5, ge=1, le=50, description="full face detection on every Nth template "
                                 "frame; the frames between are tracked (MTCNN's O-Net on the last faces)")
    node_cache_gb: float = Field(20.0, gt=0, description="each node's disposable cache (decoded template frames; "
                                 "on a node without the storage root also the templates, face tracks, mel "
                                 "features and model files fetched from the job manager): cut back to this "
                                 "size, least recently used first")
    frame_cache: bool = Field(True, description="keep a template's decoded frames in the node cache (built once "
                              "per node on a thread once a second job or a live session renders the template; "
                              "1.4 MB per 720p frame, at most a quarter of node_cache_gb or of the free disk "
                              "per template): later chunks read them instead of decoding")
    transfer_part_bytes: int = Field(8 * 1024**2, ge=1024, le=64 * 1024**2,
                                     description="bytes per part of uploads and output downloads through Ray")
    manager_mmap_threshold_bytes: int = Field(
        128 * 1024, ge=0, le=32 * 1024**2,
        description="the job manager's glibc heap: blocks of this size or more are mapped on their own "
        "and returned when freed, and freed heap past it is trimmed (cluster/heap.py); 0: glibc's "
        "dynamic thresholds, under which the manager kept several MiB per thread arena")
    upload_idle_timeout_s: float = Field(600.0, gt=0, description="an upload that received no part for this "
                                         "long is removed (its client died mid-upload)")
    min_face_fraction: float = Field(0.5, ge=0, le=1,
                                     description="fail with input.no_face when fewer frames have a face")

    # --- timeouts (seconds); every wait has a deadline -------------------------------------
    probe_timeout_s: float = Field(30.0, gt=0, description="probing one input file (its streams, duration)")
    ffmpeg_timeout_s: float = Field(1800.0, gt=0, description="one ffmpeg run or decode (an audio's decoding, a "
                                    "template's normalisation, the final mux, a segment's encoder closing)")
    batch_timeout_s: float = Field(120.0, gt=0, description="one model batch, per batch queued ahead of it on its "
                                   "worker: past it the batch is tried again (on another worker where there is one)")
    chunk_timeout_s: float = Field(900.0, gt=0, description="one chunk's render on a compositor (past it the chunk is "
                                   "tried again, up to max_chunk_attempts), and the bound of other per-chunk waits: "
                                   "HLS publishing, an avatar's preparation")
    prepare_seconds_per_template_second: float = Field(
        3.0, gt=0, description="prepare's deadline: chunk_timeout_s plus this per second of template")
    stall_timeout_s: float = Field(120.0, gt=0, description="how long a wait may see no progress: libx264 taking no "
                                   "frames, a batch finding no live model worker, a job with no live compositor or "
                                   "model worker, a compositor sending no batch while none of its batches is at the "
                                   "model and answering nothing (frozen: killed, its chunk rendered again), a job "
                                   "manager answering no ping "
                                   "(killed, Ray restarts it); past it that wait fails (render.worker_lost, "
                                   "render.encode_failed)")
    model_load_timeout_s: float = Field(300.0, gt=0, description="a model loading on a model worker: past "
                                        "it the batch's job fails (render.timeout)")
    actor_call_timeout_s: float = Field(30.0, gt=0, description="one short call to an actor (a job's status, a cancel, "
                                        "reading a stored file's part): past it the call fails")
    job_timeout_s: float = Field(6 * 3600.0, gt=0, description="a whole job, from admission to its verified output: "
                                 "past it the job fails with render.timeout")

    # --- retries --------------------------------------------------------------------------
    max_chunk_attempts: int = Field(3, ge=1, description="tries of one chunk that failed before the job "
                                    "fails (render.chunk_failed); three times as many where its compositor died "
                                    "(not the chunk's fault)")
    max_batch_attempts: int = Field(4, ge=1, description="tries of one model batch (its worker died or timed out) "
                                    "before its chunk fails with render.worker_lost")

    # --- Ray runtime ----------------------------------------------------------------------
    namespace: str = Field("lipsync", description="the Ray namespace of the product's named actors (two services on "
                           "one Ray cluster need two)")
    model_workers: int | None = Field(None, ge=1, description="model workers; default one per GPU, else 1")
    worker_gpus: float = Field(1.0, gt=0, le=8, description="GPUs per model worker (fractions allowed)")
    compositors: int | None = Field(None, ge=1, description="compositor actors; default from the cluster's CPUs "
                                    "and memory (see compositor_cpus, compositor_memory_mb)")
    compositor_cpus: float = Field(1.0, gt=0, le=64, description="Ray CPUs per compositor; its thread pools "
                                   "(OpenCV, decoder, x264) are sized from them")
    compositor_memory_mb: int = Field(500, ge=64, description="memory one compositor needs for one chunk at a "
                                      "time (measured 330-340 MiB PSS at 720p with its encoder), 40 % more for "
                                      "each further chunk at once; the default pool holds no more compositors "
                                      "than the cluster's Ray memory has room for")
    size_threads: bool = Field(True, description="size every thread pool of an actor (OpenCV, onnxruntime, "
                               "PyAV, x264, OpenBLAS) from its Ray CPUs; false: the libraries' defaults "
                               "(one thread per core each; for comparison)")
    max_inflight_per_worker: int = Field(2, ge=1, description="model batches a model worker is given at once")
    pool_reconcile_s: float = Field(5.0, gt=0, description="how often the pool follows the cluster's resources")
    models_per_worker: int = Field(2, ge=1, description="models a worker keeps loaded (LRU)")
    model_retry_s: float = Field(30.0, gt=0, description="a model that failed to load is tried again after this")
    providers: str = Field("", description="onnxruntime providers, best first, e.g. 'cuda,cpu' or "
                           "'tensorrt,cuda,cpu' (TensorRT only when named); empty: CUDA when a device "
                           "really exists, else CPU")
    cuda_options: str = Field("prefer_nhwc=1", description="CUDA execution provider options, 'key=value' comma-"
                              "separated, e.g. 'prefer_nhwc=1,cudnn_conv_algo_search=HEURISTIC'. Default NHWC "
                              "convolutions: 1.2-1.5x the frames/s of NCHW for the Wav2Lip-sized model on an H200, "
                              "float32 and float16 (docs/PERFORMANCE.md); '' for onnxruntime's defaults")
    crop: str = Field("", pattern="^(|wav2lip|aligned)$",
                      description="crop recipe for every model: 'wav2lip' (detector box + bottom pad, "
                      "as Wav2Lip was trained) or 'aligned' (similarity-aligned canonical crop); empty: "
                      "the model's `lipsync.crop` metadata, else wav2lip for S=96 and aligned otherwise")
    model_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per loaded model; "
                               "0: the model worker's Ray CPUs (size_threads) on a GPU and for the built-in "
                               "model, else onnxruntime's default (every core)")

    # --- HTTP service (`lipsync serve`, service/) ------------------------------------------
    max_queued_jobs: int = Field(64, ge=1, description="unfinished jobs admitted at once; beyond: HTTP 429")
    max_avatar_preparations: int = Field(2, ge=1, description="avatars prepared at once by the service "
                                         "(POST /v1/avatars: normalising and face detection on the job "
                                         "manager's node); beyond: HTTP 429")
    max_event_streams: int = Field(256, ge=1, description="job event streams (GET /v1/jobs/ID/events) one "
                                   "ingress replica keeps open at once (each asks the job manager about its job "
                                   "twice a second, with ?segments=1 up to twelve times); beyond: HTTP 429 (the "
                                   "SDK's wait then polls)")
    retry_after_s: int = Field(5, ge=1, description="Retry-After seconds sent with 429 and 503")
    allow_private_urls: bool = Field(False, description="URL inputs may resolve to private/loopback addresses")
    url_timeout_s: float = Field(60.0, gt=0, description="whole-download deadline of one URL input")
    url_max_redirects: int = Field(5, ge=0, le=20, description="redirects one URL input may follow")
    compat_data_dir: Path | None = Field(None, description="publish compat results as temp/<code>-r.mp4 here")
    max_batch_jobs: int = Field(100, ge=1, description="audios one POST /v1/batches may carry")
    callback_attempts: int = Field(20, ge=1, description="deliveries tried for one callback, counted across "
                                   "restarts; the waits between them double from 0.5 s up to 5 min (20: tried "
                                   "for about 54 min after the job ends)")
    callback_timeout_s: float = Field(10.0, gt=0, description="one callback delivery (POST to the callback_url)")
    retention_days: float = Field(0.0, ge=0, le=36500, description="remove finished jobs' outputs and temporary files, "
                                  "ended live sessions' files, and stored uploads and avatars unused, older than "
                                  "this (0: keep forever); never a running job's or session's, or what they use")
    record_retention_days: float = Field(0.0, ge=0, le=36500, description="remove finished jobs' records (their "
                                         "rows in the job store: a job then reads 404 job.not_found, and its id "
                                         "can be used again) and their files this long after their last change, "
                                         "at least 0.25 (6 h); 0 keeps the records forever (the job store grows "
                                         "by about 5 KB a job)")
    serve_replicas: int = Field(1, ge=1, description="ingress replicas")
    watch_url_ttl_s: int = Field(24 * 3600, ge=60, description="how long a job's signed watch_url (HLS) "
                                 "stays valid, when LIPSYNC_API_TOKEN is set: at least this, at most this plus "
                                 "the shorter of it and an hour (the expiry is rounded up, so the URL stays the "
                                 "same between polls); a player still on it then gets 401 and stops")
    public_url: str | None = Field(None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
                                   description="the service's address as its clients reach it (e.g. "
                                   "https://avatars.example.com behind a TLS proxy): the base of the absolute "
                                   "URLs a live session's view carries; unset: the request's own address, "
                                   "with a proxy's X-Forwarded-Proto/-Host")

    # --- live sessions (`POST /v1/sessions`, cluster/live/) ----------------------------------
    max_live_sessions: int = Field(4, ge=1, description="live sessions running at once; beyond: HTTP 429")
    live_cpu_share: float = Field(0.75, gt=0, le=1, description="the share of the node's cores live sessions may "
                                  "take: a new session is refused (429) when the running ones' measured render load "
                                  "plus its estimate exceeds cores x share (cluster/live/admission.py); the rest "
                                  "is left to batch jobs")
    live_node_cpus: float = Field(0.0, ge=0, description="the cores admission counts for the node that runs live "
                                  "sessions; 0: the cores the sessions' processes may run on, as they report them")
    live_session_load: float = Field(0.5, gt=0, description="a session's render load (seconds of compositing + "
                                     "model per second of stream) assumed until it has measured its own, and a "
                                     "new session's estimate before any is measured")
    live_memory_reserve_mb: float = Field(1024.0, ge=0, description="memory (MiB) of the sessions' node a new "
                                          "session must leave available (for batch jobs and the system): it is "
                                          "refused (429) when the node's available memory less its estimate (the "
                                          "running sessions' mean, their standbys included) would fall below this")
    live_session_memory_mb: float = Field(600.0, gt=0, description="a new session's memory (MiB, its actor and "
                                          "its standby) assumed before any session has measured its own")
    live_idle_timeout_s: float = Field(30.0, gt=0, description="a session that received no audio for this "
                                       "long (and has nothing left to render) ends")
    live_max_seconds: float = Field(3600.0, gt=0, description="the longest a session may run (wall clock); "
                                    "a request's max_seconds may only lower it")
    live_buffer_seconds: float = Field(5.0, gt=0, description="speech received but not yet rendered a session "
                                       "holds; a faster sender is slowed (WebSocket not read, POST 429)")
    live_batch_frames: int = Field(4, ge=1, le=64, description="frames per model batch of a session")
    live_segment_seconds: float = Field(0.5, ge=0.04, le=6.0, description="the longest live HLS segment "
                                        "(= one GOP: the frames that fit)")
    live_playlist_segments: int = Field(8, ge=3, le=100, description="segments in the live playlist's window")
    live_lead_s: float = Field(0.1, ge=0, le=2.0, description="how far ahead of its due time a batch is rendered")
    live_batch_timeout_s: float = Field(1.0, gt=0, description="a live batch the model has not answered by "
                                        "then is shown without the model (template frames) and its speech "
                                        "rendered again")
    live_rebuffer_seconds: float = Field(0.2, ge=0, le=2.0, description="an utterance starts, and speech that "
                                         "ran out mid-utterance (a sender slower than real time) speaks again, once "
                                         "this much of it is ready (or it has ended): stretches of speech and a few "
                                         "pauses, not fragments (a real-time sender's utterance stuttered at its "
                                         "start); 0: at once")
    live_catch_up: bool = Field(True, description="win back the latency the service added (batches shown without "
                                "the model while a worker was away, a takeover's stand-still) by shortening the "
                                "pauses of the speech waiting to be rendered: a pause keeps its first frame and "
                                "its last two; speech itself is never cut, and a sender's own pace is never "
                                "caught up (view: seconds_skipped)")
    live_silence_dbfs: float = Field(-45.0, ge=-96.0, le=0.0, description="a frame of speech whose level (RMS, dB "
                                     "of full scale) is at most this counts as a pause for LIPSYNC_LIVE_CATCH_UP "
                                     "(a quiet room's microphone: -60 to -50; speech: -35 to -15)")
    live_flush_after_s: float = Field(0.5, gt=0, description="speech waiting for lookahead that gets no more "
                                      "audio for this long is rendered as an utterance's end")
    live_token_ttl_s: float = Field(3600.0, gt=0, description="lifetime of a session's token (audio socket, "
                                    "playlist URLs)")
    live_keep_ended_s: float = Field(10.0, gt=0, description="an ended session's actors (its process and its "
                                     "standby) leave this long after its end; its view, stream and recording are "
                                     "then served from its directory until retention removes it "
                                     "(LIPSYNC_RETENTION_DAYS)")
    live_nice: int = Field(-10, ge=-20, le=19, description="scheduling priority (nice) of a session's render "
                           "thread and encoder, and of the model workers' live lane, so batch work on the same "
                           "cores cannot starve a live stream; below 0 needs CAP_SYS_NICE (else left as is, logged)")
    live_standby: bool = Field(True, description="a second, warm actor per session (the avatar loaded, its render "
                               "path run once) that takes the session over from its journal the moment the one "
                               "running it dies: the stream stands still under 2 s instead of a Ray "
                               "restart's 3-8 s (costs one idle process per session)")
    live_max_restarts: int = Field(3, ge=0, description="times Ray restarts a session's actor (its compositing "
                                   "and encoder) that died; it resumes from the session's journal on disk. Past "
                                   "that the session ends failed")
    live_restart_wait_s: float = Field(30.0, gt=0, description="how long the service retries a call that met a "
                                       "session's actor dead (restarting) before answering 503")
    live_crf: int = Field(23, ge=0, le=51, description="x264 constant rate factor of live streams")
    live_preset: X264Preset = Field("veryfast", description="x264 preset of live streams")

    @field_validator("storage_root", mode="before")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, str) and not v.strip():  # Path("") is the current directory: never meant
            raise ValueError("is empty (LIPSYNC_STORAGE_ROOT=): give a directory, or unset it for the default")
        return v

    @field_validator("api_token", "callback_secret", mode="after")
    @classmethod
    def _secret_not_blank(cls, v: SecretStr | None, info) -> SecretStr | None:
        """A secret that is set but blank (`LIPSYNC_API_TOKEN=`, a missing k8s secret key, an empty
        EnvironmentFile line) is a mistake, never a request for no authentication: refused."""
        if v is not None and not v.get_secret_value().strip():
            raise ValueError(f"is set but empty (LIPSYNC_{info.field_name.upper()}=): give it a value, or unset "
                             "the variable" + (" for no authentication (loopback only)" if info.field_name ==
                                               "api_token" else " to sign callbacks with the API token"))
        return v

    @field_validator("storage_root", "compat_data_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    @field_validator("providers", mode="after")
    @classmethod
    def _provider_names(cls, v: str) -> str:
        """Names `cluster.models.providers.PROVIDER_NAMES` knows (a typo failed every model load)."""
        unknown = [p for p in (x.strip().lower() for x in v.split(",")) if p and p not in PROVIDER_CHOICES]
        if unknown:
            raise ValueError(f"unknown provider {unknown[0]!r} in {v!r} (expected a comma-separated list of "
                             f"{', '.join(PROVIDER_CHOICES)}, best first)")
        return v

    @field_validator("audio_bitrate", mode="after")
    @classmethod
    def _aac_bitrate(cls, v: str) -> str:
        """A bitrate the AAC encoder takes (it was parsed only at a job's encode: a typo failed every job)."""
        import re

        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kK]?)\s*", v)
        bps = float(m.group(1)) * (1000 if m.group(2) else 1) if m else None
        if bps is None or not 8000 <= bps <= 512000:
            raise ValueError(f"{v!r} is not an AAC bitrate of 8k-512k (e.g. 128k, or 128000 bits a second)")
        return v.strip() if m.group(2) else str(int(bps))  # whole bits a second, as the encoder takes them

    @field_validator("record_retention_days", mode="after")
    @classmethod
    def _record_retention(cls, v: float) -> float:
        """0, or long enough for a job's id, used again once its record is gone, not to meet its old run's stop
        (`cluster.stopping.REMEMBERED_STOP_S`, 6 h)."""
        if 0 < v < 0.25:
            raise ValueError(f"{v:g} days is shorter than 0.25 (6 h): 0 keeps the records, else at least 0.25")
        return v

    @field_validator("worker_gpus", mode="after")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):  # Ray places fractions of one GPU only
            raise ValueError(f"{v:g}: a share above 1 GPU must be a whole number (fractions only below 1)")
        return v

    @field_validator("model", mode="after")
    @classmethod
    def _model_home(cls, v: str) -> str:
        """A model file under the user's home as `~/m.onnx` (the shell leaves `~` alone in KEY=~/x), or
        relative to this process's directory, made absolute: the processes that load it run elsewhere."""
        from cluster.schemas import is_named_model

        if not v.strip():  # not the current directory, as a path made absolute would read
            raise ValueError("is empty: expected 'builtin', 'builtin:S', 'latency:<ms>[:S]' or the path of an "
                             ".onnx file")
        return v if is_named_model(v) else absolute_path(v)

    @field_validator("ffmpeg", mode="after")
    @classmethod
    def _ffmpeg_path(cls, v: str | None) -> str | None:
        """An ffmpeg named by a path, made absolute (a bare name is looked up on PATH by each process)."""
        return absolute_path(v) if v and (os.sep in v or v.startswith("~")) else v

    @field_validator("input_roots", mode="after")
    @classmethod
    def _absolute_roots(cls, v: str) -> str:
        return ":".join(absolute_path(p) if p.strip() else p for p in v.split(":"))

    @model_validator(mode="after")
    def _deadlines_agree(self) -> "Settings":
        """Deadlines that nest must nest: a chunk waits for its batches. A chunk deadline under its batches' own
        let a stalled model worker be blamed on (and kill) the compositors whose batches waited for it, before the
        batch's deadline sent them elsewhere. (A job deadline under a chunk's is allowed: it bounds everything.)"""
        batches = self.batch_timeout_s * self.max_inflight_per_worker
        if self.chunk_timeout_s <= batches:
            raise ValueError(
                f"LIPSYNC_CHUNK_TIMEOUT_S ({self.chunk_timeout_s:g}) must exceed LIPSYNC_BATCH_TIMEOUT_S x "
                f"LIPSYNC_MAX_INFLIGHT_PER_WORKER ({self.batch_timeout_s:g} x {self.max_inflight_per_worker} = "
                f"{batches:g}): a chunk would be given up (its compositor blamed) before a batch it waits for is")
        return self

    def live_token_warning(self) -> str | None:
        """Why a live session's viewers may lose their stream mid-session, if they may: tokens that expire
        before a session may end (allowed: the SDK and the web page renew theirs; a plain player cannot)."""
        if self.api_token is None or self.live_token_ttl_s >= self.live_max_seconds:  # (unsigned URLs never expire)
            return None
        return (f"LIPSYNC_LIVE_TOKEN_TTL_S ({self.live_token_ttl_s:g}) is below LIPSYNC_LIVE_MAX_SECONDS "
                f"({self.live_max_seconds:g}): a live session's hls_url stops working in a plain player after "
                f"{self.live_token_ttl_s:g} s while the session runs (the SDK and the web page renew theirs)")

    def admission_timeout_s(self) -> float:
        """How long the service waits for one job's admission by the job manager (probing both inputs on
        its node, copying them): more than a plain call."""
        return max(self.actor_call_timeout_s, self.probe_timeout_s * 2 + 10)

    def callback_key(self) -> str | None:
        secret = self.callback_secret or self.api_token
        return secret.get_secret_value() if secret is not None else None

    def overrides(self, only_set: bool = False) -> dict:
        """These settings as plain values for another process (`Settings(**overrides)`): secrets as
        their values (a JSON dump masks them as `**********`); `only_set`: only what was given
        (arguments, LIPSYNC_* environment), the rest left to that process's own environment."""
        out = self.model_dump(mode="json", exclude_unset=only_set)
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and (not only_set or name in self.model_fields_set):
                out[name] = value.get_secret_value()
        return out

    @property
    def node_cache_bytes(self) -> int:
        return int(self.node_cache_gb * 1024**3)

    @property
    def node_cache_dir(self) -> Path:
        """This node's disposable cache (`cluster.nodecache`, `cluster.media.framecache`)."""
        return self.storage_root / "node-cache"

    def fingerprint(self) -> str:
        """A short hash of every setting: actors built with other settings are replaced."""
        import hashlib

        return hashlib.sha1(self.model_dump_json().encode()).hexdigest()[:12]

    @property
    def input_root_paths(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.input_roots.split(":") if p.strip()]

    @property
    def input_root_paths_as_written(self) -> list[Path]:
        """The input roots before symlinks are resolved (a root under /tmp where /tmp is a symlink): a path
        under one as written is resolved, and must then lie under `input_root_paths`."""
        return [Path(os.path.abspath(os.path.expanduser(p))) for p in self.input_roots.split(":") if p.strip()]

    # storage layout ------------------------------------------------------------------------
    def dir(self, name: str) -> Path:
        """A sub-directory of the storage root (created): inputs, templates, avatars, models, jobs."""
        p = self.storage_root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def db_path(self) -> Path:
        return self.storage_root / "jobs.sqlite3"


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


#: Variables with the settings' prefix that are not settings: the shell client's service URL, and what the
#: tests and benchmarks read (`LIPSYNC_TEST_*`, `LIPSYNC_BENCH_*`, `LIPSYNC_CHAOS_SEED`)
NOT_SETTINGS = ("LIPSYNC_URL", "LIPSYNC_CHAOS_SEED")
NOT_SETTINGS_PREFIXES = ("LIPSYNC_TEST_", "LIPSYNC_BENCH_")
#: What Kubernetes sets in every pod for each Service of its namespace (`enableServiceLinks`): the services
#: `lipsync-api`, `lipsync-head-svc`, ... give `LIPSYNC_API_SERVICE_HOST`, `LIPSYNC_API_PORT_8000_TCP_ADDR`, ...
SERVICE_LINK = re.compile(r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)"
                          r"(_ADDR|_PORT|_PROTO)?)?)$")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The `LIPSYNC_*` variables of `environ` that name no setting, each said with the setting it may have
    meant (pydantic settings ignore them: `LIPSYNC_API_TOKNE=...` started a service without a token)."""
    import difflib

    known = [name.upper() for name in Settings.model_fields]
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if (not upper.startswith("LIPSYNC_") or upper[8:] in known or upper in NOT_SETTINGS
                or upper.startswith(NOT_SETTINGS_PREFIXES) or SERVICE_LINK.match(upper)):
            continue
        close = difflib.get_close_matches(upper[8:], known, n=1, cutoff=0.75)
        found.append(f"{name} is not a setting" + (f" (did you mean LIPSYNC_{close[0]}?)" if close else ""))
    return found


def settings_reference() -> str:
    """docs/SETTINGS.md: every setting with its environment variable, default and description, in the
    sections of `Settings` (its `# --- name ---` comments). `python -m cluster.config > docs/SETTINGS.md`
    writes it; tests/test_config.py keeps the file equal to it."""
    import inspect
    import re
    import typing

    def default(field) -> str:
        if field.default_factory is not None:
            value = Path(field.default_factory())  # (the storage root's: shown under ~, as for any user)
            return f"`~/{value.relative_to(Path.home())}`" if value.is_relative_to(Path.home()) else f"`{value}`"
        if field.default is None:
            return "unset"
        if isinstance(field.default, bool):
            return f"`{str(field.default).lower()}`"
        return f"`{field.default}`" if field.default != "" else "empty"

    def value_range(field) -> str:
        words = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
        said = [f"{words[key]} {getattr(bound, key)}" for bound in field.metadata for key in words
                if hasattr(bound, key)]
        return ", ".join(said)

    out = ["# Settings", "",
           "Every setting is an environment variable (`LIPSYNC_<NAME>`; `cluster/config.py`, pydantic settings).",
           "Set it where the service starts: where `lipsync serve` or `lipsync render` runs, or on the head pod in",
           "KubeRay (the manifests' `env`). The actors it starts (job manager, model workers, compositors, live",
           "sessions) are given its settings, on whatever node they run; the manifests also set",
           "`LIPSYNC_STORAGE_ROOT` and `LIPSYNC_LOG_FORMAT` on the worker pods, for what runs there before an",
           "actor does. This file is generated from the code: `python -m cluster.config > docs/SETTINGS.md`.", ""]
    fields = Settings.model_fields
    for line in inspect.getsource(Settings).splitlines():
        if m := re.match(r"\s+# --- (.+?) -+$", line):
            title = m.group(1)[0].upper() + m.group(1)[1:]
            out += ([""] if out[-1] else []) + [f"## {title}", "", "| variable | default | what |", "|---|---|---|"]
        elif (m := re.match(r"    (\w+): ", line)) and m.group(1) in fields:
            field = fields[m.group(1)]
            what = (field.description or "").replace("|", "\\|")
            if typing.get_origin(field.annotation) is Literal:  # what it takes, all of it
                what += f" (one of: {', '.join(map(str, typing.get_args(field.annotation)))})"
            if bounds := value_range(field):
                what += f" ({bounds})"
            out.append(f"| `LIPSYNC_{m.group(1).upper()}` | {default(field)} | {what} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
