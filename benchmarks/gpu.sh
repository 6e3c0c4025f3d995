#!/usr/bin/env bash
# One prepared GPU benchmark for a single 10-minute device slot (issue 15). Prints ONE JSON object on
# stdout (stage logs go to stderr):
#   barlowtwins  Barlow Twins pretraining images/s, ResNet-50, 224 px, batch 256, bf16 autocast,
#                channels_last: fed by the pipeline's loader and by in-memory tensors (one batch kept
#                on the GPU), their ratio (goal >= 0.9), and the goal >= 3 x 590 images/s
#   gmml         GMML ViT-S/16 images/s (same feeds)
#   input_path   loader image pairs/s of the pipeline's uint8 cache path vs the reference PIL path
#   detection    torchvision-engine training-iteration time at 640 px (ResNet-50 FPN, batch 2) vs
#                stock torchvision; mmdet: reported as not measured (see "mmdet" in the JSON)
#   ablation_cam fast Ablation-CAM seconds per image (ResNet-50 detector, 640 px, 1000 proposals)
#   ddp          Barlow Twins under torchrun + NCCL on every visible GPU (>= 2), global batch 256 x GPUs
#   compile      (only with --compile) Barlow Twins with torch.compile vs eager, in-memory feed
# Every stage runs under its own time limit (`timeout`), so one hung stage cannot eat the slot; a
# stage that fails or times out is reported with its status and the tail of its log.
#
#   bash benchmarks/gpu.sh            # on the GPU machine (about 8 minutes)
#   bash benchmarks/gpu.sh --dry      # the same stages on CPU at tiny sizes (tests/test_benchmarks.py)
#   bash benchmarks/gpu.sh --compile  # also the torch.compile stage (adds about 3 minutes)
# Environment: PYTHON (default python3), GPU_SH_WORKERS (DataLoader workers, default: CPUs - 2),
# GPU_SH_OUT (also write the JSON there).
set -u -o pipefail

DRY=0
COMPILE=0
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    --compile) COMPILE=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export CXRSSL_PROGRESS=0 PYTHONUNBUFFERED=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cxrssl_gpu_sh.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
CPUS="$(nproc 2>/dev/null || echo 4)"
WORKERS="${GPU_SH_WORKERS:-$(( CPUS > 3 ? CPUS - 2 : 1 ))}"
B="$REPO/benchmarks"

if [ "$DRY" = 1 ]; then
  DEV=cpu; WORKERS=0; NGPU=0
  BT="--arch resnet18 --crop 32 --batch-size 4 --n-images 8 --cache-size 40 --steps 1 --projector 32 32"
  GM="--vit-arch vit_tiny_patch8 --crop 32 --batch-size 4 --n-images 8 --cache-size 40 --steps 1"
  REF="--n-images 4 --png-size 64 --cache-size 40 --crop 32 --batch-size 2"
  DET="--arch resnet18 --init random --res 64 --batch-size 1 --rpn-proposals 20 --rois-per-image 16 --steps 1"
  CAM="--arch resnet18 --size 64 --proposals 10 --ratio 0.1 --n-images 1 --batch-size 16 --threads 1"
  T_BT=240; T_GM=240; T_REF=240; T_DET=240; T_CAM=240; T_DDP=240; T_CMP=240
else
  DEV=cuda
  NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  BT="--arch resnet50 --crop 224 --batch-size 256 --n-images 1536 --cache-size 256 --steps 15 --warmup-steps 3
      --projector 8192 8192 8192"
  GM="--vit-arch vit_small_patch16 --crop 224 --batch-size 256 --n-images 1536 --cache-size 256 --steps 15
      --warmup-steps 3"
  REF="--n-images 192 --png-size 1024 --cache-size 256 --crop 224 --batch-size 64"
  DET="--arch resnet50 --init imagenet --res 640 --batch-size 2 --rpn-proposals 1000 --rois-per-image 512 --steps 10"
  CAM="--arch resnet50 --size 640 --proposals 1000 --ratio 0.1 --n-images 3 --batch-size 64"
  T_BT=170; T_GM=110; T_REF=80; T_DET=100; T_CAM=80; T_DDP=150; T_CMP=200
fi

log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" >&2; }

# stage NAME LIMIT_S CMD...: runs CMD under `timeout`, its output in $WORK/NAME.log, status in NAME.status
stage() {
  local name="$1" limit="$2"; shift 2
  log "stage $name (limit ${limit} s)"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  local status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status="timeout after ${limit} s"; elif [ $rc != 0 ]; then status="failed (exit $rc)"; fi
  echo "$status" >"$WORK/$name.status"
  echo $(( SECONDS - start )) >"$WORK/$name.seconds"
  log "stage $name: $status in $(( SECONDS - start )) s"
  [ "$status" = ok ] || tail -n 15 "$WORK/$name.log" >&2
}

PT=("$PY" "$B/pretrain_throughput.py" --device "$DEV" --workers "$WORKERS")
# shellcheck disable=SC2086
stage barlowtwins "$T_BT" "${PT[@]}" --skip-reference --in-memory --methods barlowtwins $BT --json "$WORK/barlowtwins.json"
# shellcheck disable=SC2086
stage gmml "$T_GM" "${PT[@]}" --skip-reference --in-memory --methods gmml $GM --json "$WORK/gmml.json"
# shellcheck disable=SC2086
stage input_path "$T_REF" "${PT[@]}" --arch none --methods $REF --json "$WORK/input_path.json"
# shellcheck disable=SC2086
stage detection "$T_DET" "$PY" "$B/detection_step.py" --device "$DEV" $DET --out "$WORK/detection.json"
# shellcheck disable=SC2086
stage ablation_cam "$T_CAM" "$PY" "$B/heatmaps.py" --no-library --device "$DEV" $CAM --out "$WORK/ablation_cam.json"
if [ "$NGPU" -ge 2 ]; then
  # shellcheck disable=SC2086
  stage ddp "$T_DDP" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" "$B/pretrain_throughput.py" \
    --ddp --device cuda --workers "$(( WORKERS / NGPU > 0 ? WORKERS / NGPU : 1 ))" --skip-reference --methods barlowtwins \
    $BT --batch-size "$(( 256 * NGPU ))" --n-images "$(( 1536 * NGPU ))" --json "$WORK/ddp.json"
else
  echo "skipped: $NGPU GPU(s) visible, DDP needs >= 2" >"$WORK/ddp.status"
fi
if [ "$COMPILE" = 1 ]; then
  # shellcheck disable=SC2086
  stage compile "$T_CMP" "${PT[@]}" --skip-reference --compile --warmup-steps 3 --methods barlowtwins $BT \
    --json "$WORK/compile.json"
fi

"$PY" - "$WORK" "$DRY" "$NGPU" <<'EOF'
import json, os, subprocess, sys
from pathlib import Path

work, dry, ngpu = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
STAGES = ("barlowtwins", "gmml", "input_path", "detection", "ablation_cam", "ddp", "compile")
GOAL_RATE, GOAL_LOADER = 3 * 590, 0.9


def load(name):
    status_file = work / f"{name}.status"
    if not status_file.exists():
        return None
    status = status_file.read_text().strip()
    entry = {"status": status}
    if (work / f"{name}.seconds").exists():
        entry["stage_s"] = int((work / f"{name}.seconds").read_text())
    if status == "ok" and (work / f"{name}.json").exists():
        entry["figures"] = json.loads((work / f"{name}.json").read_text())
    elif status != "ok" and (work / f"{name}.log").exists():
        entry["log_tail"] = (work / f"{name}.log").read_text(errors="replace").splitlines()[-8:]
    return entry


def gpu_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()
    except Exception:
        return []


out = {"dry": dry, "gpus": ngpu, "gpu_names": gpu_name(), "stages": {}}
for name in STAGES:
    entry = load(name)
    if entry is not None:
        out["stages"][name] = entry
fig = {k: v.get("figures", {}) for k, v in out["stages"].items()}
bt, gm = fig.get("barlowtwins", {}), fig.get("gmml", {})
det, cam, ref = fig.get("detection", {}), fig.get("ablation_cam", {}), fig.get("input_path", {})
ddp, cmp_ = fig.get("ddp", {}), fig.get("compile", {})
out["barlowtwins_images_per_s_loader"] = bt.get("method_barlowtwins_images_per_s")
out["barlowtwins_images_per_s_in_memory"] = bt.get("method_barlowtwins_images_per_s_in_memory")
out["barlowtwins_loader_vs_in_memory"] = bt.get("loader_vs_in_memory_barlowtwins")
out["gmml_images_per_s_loader"] = gm.get("method_gmml_images_per_s")
out["gmml_images_per_s_in_memory"] = gm.get("method_gmml_images_per_s_in_memory")
out["gmml_loader_vs_in_memory"] = gm.get("loader_vs_in_memory_gmml")
out["input_path_loader_pairs_per_s_pipeline"] = ref.get("loader_pairs_per_s_pipeline")
out["input_path_loader_pairs_per_s_reference"] = ref.get("loader_pairs_per_s_reference")
out["input_path_loader_ratio"] = ref.get("loader_ratio")
median = det.get("median_step_s", {})
out["detection_torchvision_iteration_s"] = median.get("cxrssl")
out["detection_stock_torchvision_iteration_s"] = median.get("stock torchvision")
out["detection_res"] = (det.get("config") or {}).get("res")
try:
    import mmdet  # noqa: F401
    out["mmdet"] = "importable; not timed by this script (no mmdet step benchmark yet)"
except Exception as error:  # mmcv/mmdet missing or broken
    out["mmdet"] = f"not importable ({type(error).__name__}): not timed"
out["ablation_cam_s_per_image"] = next(iter(cam.get("mean", {}).values()), {}).get("fast_s")
out["ddp_images_per_s"] = ddp.get("method_barlowtwins_images_per_s")
out["ddp_world_size"] = ddp.get("ddp_world_size")
out["ddp_backend"] = ddp.get("ddp_backend")
if cmp_:
    out["compile_barlowtwins_speedup"] = cmp_.get("compile_speedup_barlowtwins")
rate, ratio = out["barlowtwins_images_per_s_loader"], out["barlowtwins_loader_vs_in_memory"]
out["goal_barlowtwins_rate"] = {"target_images_per_s": GOAL_RATE, "value": rate,
                                "met": None if dry or rate is None else rate >= GOAL_RATE}
out["goal_loader_not_bottleneck"] = {"target_ratio": GOAL_LOADER, "value": ratio,
                                     "met": None if dry or ratio is None else ratio >= GOAL_LOADER}
out["failed_stages"] = [k for k, v in out["stages"].items()
                        if v["status"] != "ok" and not v["status"].startswith("skipped")]
text = json.dumps(out, indent=1)
print(text)
if os.environ.get("GPU_SH_OUT"):
    Path(os.environ["GPU_SH_OUT"]).write_text(text + "\n")
EOF
