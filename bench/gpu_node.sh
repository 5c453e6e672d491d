#!/usr/bin/env bash
# The issue-19 measurements on a GPU machine lent for minutes (one H100/H200, 16 cores), in one go,
# the most wanted first, each step bounded so that a slow one cannot eat the next: the kit (`.gpu/`,
# see its run.sh) unpacked, then (1) `bench.throughput` warm service, thread pools sized, segments
# encoded in the compositors, both models, 180 s of speech (frames/s, CPU per frame, where the
# compositors wait; template frames from the node's frame cache); (2) the Wav2Lip-sized model, 120 s
# of speech, with the template decoded per chunk (`--variants decoded`: no frame cache, the render
# before 2026-12-06), with each segment encoded by an ffmpeg child (the encoder before 2026-12-05),
# with half the compositors at 2 CPUs each (`--variants wide`:
# fewer, multi-threaded compositors against one per CPU) and with two chunks at once per compositor
# (`--variants chunks2`: the next chunk starts while the last one's encoder finishes); (3) issue 21's live sessions per GPU: `bench live --only ramp`
# (sessions driven through the runtime, no HTTP service: the kit has no FastAPI) with the
# Wav2Lip-sized model, 1, 4, 8, 12, 16 sessions at once, 20 s of speech each; (4)
# `bench/gpu_precision.py` (float16 vs float32 under CUDA options, I/O binding, graph placement);
# (5) N classic pipelines side by side (N = the pool's compositors from step 1) on the Wav2Lip-sized
# model (measured on 2026-12-04: 132 frames/s; the libraries' default thread pools too:
# `--variants library`); (6) `bench classic`, 30 s of speech, Wav2Lip-sized model: the one-shot
# `lipsync render` against the classic pipeline on 16 cores (issue 19's 1.5x target; measured there
# only before the job-only Ray of 2026-12-05). Results land in $OUT (or ./gpu-out): run.log,
# sized.json, variants.json, live.json, gpu_precision-*.json, classic.json, oneshot.json.
# The steps' bounds add up to more than one 600 s call: STEPS picks them (default "1 2 3 4 5"),
# e.g. STEPS="1 2" in one call and STEPS="3 6" in the next.
#   bash bench/gpu_node.sh [classic seconds, default 30: 16 pipelines of 30 s fitted in 170 s on the H200 node]
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
R="bash .gpu/run.sh"; CLASSIC_S=${1:-30}; STEPS=${STEPS:-1 2 3 4 5}
want() { [[ " $STEPS " == *" $1 "* ]]; }
reap() { pkill -9 -f 'ray::|raylet|gcs_server|dashboard|bench.reference_pipeline' 2>/dev/null; sleep 2; }
step() { echo "=== $(date -u +%T) $*"; }
step machine; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2
step kit; time $R python3 -c 'import onnxruntime as o, ray, av; print(o.__version__, o.get_available_providers(), ray.__version__)'
if want 1; then
step "1 sized"; timeout 230 $R python3 -m bench.throughput --seconds 180 --variants sized --no-classic \
  --model builtin --model wav2lip96; cp bench/results/throughput.adhoc.json "$OUT/sized.json"; reap
fi
if want 2; then
step "2 decoded per chunk, wide compositors, two chunks at once, ffmpeg child"; timeout 230 $R python3 \
  -m bench.throughput --seconds 120 --variants decoded,chunks2,wide,ffmpeg --no-classic --model wav2lip96 && cp bench/results/throughput.adhoc.json "$OUT/variants.json"; reap
fi
if want 3; then
step "3 live ramp"; timeout 200 $R python3 -m bench live --only ramp --ramp 1,4,8,12,16 --model wav2lip96 \
  --seconds 20; cp bench/results/live.json "$OUT/live.json"; reap
fi
if want 4; then
step "4 precision"; timeout 120 $R python3 bench/gpu_precision.py --out "$OUT" --iters 15; reap
fi
if want 5; then
N=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['figures']['runs'][0]['sized']['pool']['compositors'])" "$OUT/sized.json" 2>/dev/null || echo 14)
step "5 classic x$N ${CLASSIC_S}s"; timeout 170 $R python3 -m bench.throughput --classic-only "$N" --seconds "$CLASSIC_S" \
  --model wav2lip96; cp bench/results/throughput.classic.json "$OUT/classic.json"; reap
fi
if want 6; then
step "6 one-shot vs classic"; timeout 200 $R python3 -m bench classic --seconds 30 --model wav2lip96 \
  && cp bench/results/classic.json "$OUT/oneshot.json"; reap
fi
step done
