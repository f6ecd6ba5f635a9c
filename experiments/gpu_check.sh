#!/usr/bin/env bash
# The GPU check kit (README "GPU check"): what has to hold on a GPU, checked in one command of at most 8 minutes
# on a bare machine whose python3 has torch but not Hydra: the kit's .gpu_kit/ folder (built beforehand, where
# pip reaches the package index) travels with the checkout and goes on PYTHONPATH. No install of the project.
#
#   bash experiments/gpu_check.sh --build                  # once: .gpu_kit/ (hydra-core, omegaconf, antlr4)
#   bash experiments/gpu_check.sh                          # on the GPU machine, from a copy of the checkout
#   bash experiments/gpu_check.sh --device cpu --small     # the rehearsal on a CPU (GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1)
#
# Steps, each under its own timeout; a failing step does not stop the others:
#   (a) versions  (b) CUDA-only tests  (c) training steps without host syncs  (d) a poisoned step
#   (e) exact resume  (f) a CPU checkpoint resumed on the GPU  (g) task=benchmark compiled  (h) the same eager
#   (i) 10,000 images with dpm_solver  (j) the top kernels of profiled training steps
# Everything goes to $OUT (default outputs/gpu_check): summary.txt (a line per step: PASS, FAIL or TIMEOUT),
# results.json (every step's numbers) and four logs. The exit status is 1 when any step did not pass.
#
# Environment: OUT, GPU_CHECK_DEVICE (cuda), GPU_CHECK_SMALL (0), GPU_CHECK_SECONDS (the whole kit's budget: 450
# on a GPU, 1800 with --device cpu), PYTHON (python3).
set -uo pipefail # no -e: a failing step is recorded and the next one runs
[[ -n ${OUT:-} ]] && mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) # as given, from where the command runs
cd "$(dirname "$0")/.."
root=$PWD
kit=.gpu_kit
python=${PYTHON:-python3}
# Pure-Python packages the code path needs and a bare GPU image lacks (PyYAML and packaging, which they need,
# are there). The ranges are pyproject.toml's.
kit_packages=("hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" "antlr4-python3-runtime==4.9.3")

device=${GPU_CHECK_DEVICE:-cuda}
small=${GPU_CHECK_SMALL:-0}
build=0
while (($#)); do
  case $1 in
    --build) build=1 ;;
    --device) device=$2; shift ;;
    --device=*) device=${1#*=} ;;
    --small) small=1 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if ((build)); then
  rm -rf "$kit"
  "$python" -m pip install --quiet --no-deps --no-compile --target "$kit" "${kit_packages[@]}" || exit 1
  rm -rf "$kit"/bin
  PYTHONPATH=$root/$kit "$python" -c 'import hydra, omegaconf; print("hydra", hydra.__version__, "omegaconf", omegaconf.__version__)' || exit 1
  echo "$kit: $(du -sh "$kit" | cut -f1), $(find "$kit" -type f | wc -l) files"
  exit 0
fi

out=${OUT:-$root/outputs/gpu_check}
mkdir -p "$out"
rm -f "$out"/summary.txt "$out"/results.json "$out"/*.log
if [[ ! -d $kit ]] && ! "$python" -c 'import hydra' 2>/dev/null; then
  echo "gpu_check.sh: no $kit/ and no hydra in $python: run 'bash experiments/gpu_check.sh --build' first" >&2
fi
export PYTHONPATH=$root/$kit:$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 WANDB_SILENT=true GPU_CHECK_DEVICE=$device
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
common=(--device "$device" --results "$out/results.json" --work "$work")
((small)) && common+=(--small)

# Seconds: the whole kit's budget; each step's cap, and what it needs at the least (on an H100, with a margin).
# A step gets its cap, or what is left of the budget once the steps after it have what they need, whichever is
# less: the kit ends within the budget (8 minutes less a margin on a GPU) whatever hangs. Compiling the 35.7M UNet
# takes minutes: (g) has the largest cap. With --device cpu every cap and need is 4 times larger.
if [[ $device == cpu ]]; then budget=${GPU_CHECK_SECONDS:-1800} scale=4; else budget=${GPU_CHECK_SECONDS:-450} scale=1; fi
names=(a b c d e f g h i j)
declare -A cap=([a]=20 [b]=60 [c]=60 [d]=40 [e]=60 [f]=60 [g]=240 [h]=60 [i]=60 [j]=45)
declare -A need=([a]=5 [b]=15 [c]=20 [d]=15 [e]=25 [f]=25 [g]=60 [h]=30 [i]=35 [j]=30)
declare -A title=([a]="versions" [b]="CUDA-only tests" [c]="steps without host syncs" [d]="poisoned step skipped"
  [e]="exact resume" [f]="CPU checkpoint resumed" [g]="benchmark, compiled" [h]="benchmark, eager"
  [i]="sampling, dpm_solver" [j]="profiled steps")
declare -A logs=([a]=env_tests [b]=env_tests [c]=training [d]=training [e]=training [f]=training [g]=benchmark
  [h]=benchmark [i]=sample_profile [j]=sample_profile)
declare -A status seconds limits codes
start=$(date +%s)
deadline=$((start + budget))

step() { # KEY COMMAND...: runs one step under its timeout, appending to its group's log
  local key=$1 later=0 other after=0 limit began rc log
  shift
  log=$out/${logs[$key]}.log
  for other in "${names[@]}"; do
    ((after)) && later=$((later + need[$other] * scale))
    [[ $other == "$key" ]] && after=1
  done
  limit=$((deadline - $(date +%s) - later))
  ((limit > cap[$key] * scale)) && limit=$((cap[$key] * scale))
  limits[$key]=$limit codes[$key]=
  if ((limit < 5)); then
    status[$key]=TIMEOUT seconds[$key]=0
    echo "=== ($key) ${title[$key]}: not started, the kit's budget of ${budget} s is spent" | tee -a "$log"
    return
  fi
  echo "=== ($key) ${title[$key]}: timeout ${limit} s: $*" >>"$log"
  began=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  seconds[$key]=$(($(date +%s) - began)) codes[$key]=$rc
  if ((rc == 0)); then
    status[$key]=PASS
  elif ((rc == 124 || rc == 137)) && ((seconds[$key] >= limit)); then
    status[$key]=TIMEOUT
    echo "=== ($key) stopped after its timeout of ${limit} s" >>"$log"
  else
    status[$key]=FAIL
  fi
  printf '(%s) %-26s %-7s %4d s\n' "$key" "${title[$key]}" "${status[$key]}" "${seconds[$key]}"
}

check=(experiments/gpu_check.py)
echo "gpu_check: device $device$( ((small)) && echo ' (small)'), budget ${budget} s, results in $out"
step a "$python" "${check[@]}" versions "${common[@]}"
step b "$python" "${check[@]}" tests "${common[@]}"
step c "$python" "${check[@]}" sync "${common[@]}"
step d "$python" "${check[@]}" nonfinite "${common[@]}"
step e "$python" "${check[@]}" resume "${common[@]}"
step f "$python" "${check[@]}" cross-device "${common[@]}"
backend=inductor
((small)) && backend=aot_eager # the rehearsal: dynamo and AOTAutograd without inductor's minutes of codegen
step g env TORCH_LOGS=recompiles,graph_breaks "$python" "${check[@]}" benchmark --compile-backend $backend "${common[@]}"
step h "$python" "${check[@]}" benchmark --eager "${common[@]}"
step i "$python" "${check[@]}" sample "${common[@]}"
step j "$python" "${check[@]}" profile "${common[@]}"

failed=0
read_note='import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], {}).get("note", ""))'
{
  echo "gpu_check on $device$( ((small)) && echo ' (small)'): $(date -u +%FT%TZ), $(($(date +%s) - start)) s in all"
  for key in "${names[@]}"; do
    note=$("$python" -c "$read_note" "$out/results.json" "$key" 2>/dev/null)
    if [[ ${status[$key]} == TIMEOUT && -z ${codes[$key]} ]]; then
      note="not started: the kit's budget of ${budget} s was spent"
    elif [[ ${status[$key]} == TIMEOUT ]]; then
      note="stopped at its timeout of ${limits[$key]} s (${logs[$key]}.log)${note:+; $note}"
    elif [[ -z $note && ${status[$key]} == FAIL ]]; then
      note="exit status ${codes[$key]} (${logs[$key]}.log)"
    fi
    printf '(%s) %-26s %-7s %4d s  %s\n' "$key" "${title[$key]}" "${status[$key]}" "${seconds[$key]}" "$note"
    [[ ${status[$key]} == PASS ]] || failed=1
  done
} >"$out/summary.txt"
echo
cat "$out/summary.txt"
exit $failed
