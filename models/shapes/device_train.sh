#!/usr/bin/env bash
# Train the bundled shapes model from a seed on a GPU box (the `device` tool's H200), and bring the
# exported pipeline back as files of <= 15 MiB (the tool returns at most 8 files of 16 MiB).
#
# That box has torch, transformers, peft and safetensors but not diffusers, and reaches no index. Here,
# once per session, fetch the wheel (pure Python) into an ignored folder:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1
# then call the tool:  run(command="bash models/shapes/device_train.sh", carry=[".whl"], timeout_s=600)
#
# A call stops its training after $MINUTES (default 8.5), checkpointed in $RUN_DIR. The box keeps ignored
# files while it stays warm (30 s after a call), so calling again at once resumes there; a cold box starts
# from the seed again. Once the base stage is done, $OUT/shapes.tar.part-* hold the pipeline (check them with
# $OUT/shapes.sha256); here:  cat <files_at>/shapes.tar.part-* | tar -x -C <dir>, then
#   diffuserve eval shapes --model <dir>    (the bars, and the image time, are measured on the 2-core CPU)
# The base and adapter stages run compiled ($COMPILE, default inductor; empty: eager): this small UNet's eager
# step is thousands of kernel launches. $RENDER_WORKERS (default 12) processes render the images.
# Extra arguments go to `train shapes` (the tests pass tiny step counts and --device cpu).
set -euo pipefail
RUN_DIR=${RUN_DIR:-runs/device}
MINUTES=${MINUTES:-8.5}
OUT=${OUT:-$RUN_DIR/returned}
mkdir -p "$OUT" "$RUN_DIR"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"

# tqdm redraws its bar with carriage returns: keep one line per redraw in the log that comes back.
start=$(date +%s)
set +e
PYTHONUNBUFFERED=1 "$PY" -m models.shapes train shapes --device cuda --run-dir "$RUN_DIR" --out "$RUN_DIR/out" \
    --minutes "$MINUTES" --render-workers "${RENDER_WORKERS:-12}" \
    --compile "${COMPILE-inductor}" "$@" 2>&1 | tr '\r' '\n' | tee -a "$OUT/train.log" | tee "$RUN_DIR/call.log"
status=${PIPESTATUS[0]}
set -e
echo "this call trained for $(( $(date +%s) - start )) s (exit $status)" | tee -a "$OUT/train.log"
[ "$status" -eq 0 ] || exit "$status"

# Once the base stage is done its pipeline comes back, with the adapters finished so far: the adapter stages
# (~50 min on 2 CPU cores) can also be finished off the box, from that directory:
#   diffuserve train shapes --stage stripes --stage outline --out DIR --run-dir runs/adapters
# The refine stage needs the run directory's VAE checkpoints as well as that pipeline, so it runs on the box.
complete=false
grep -q "every stage of the recipe is done" "$RUN_DIR/call.log" && complete=true
if [ -f "$RUN_DIR/out/model_index.json" ]; then
    tar -C "$RUN_DIR/out" -cf - . | split -b 15M -d - "$OUT/shapes.tar.part-"
    (cd "$OUT" && sha256sum shapes.tar.part-* > shapes.sha256)
    what=complete
    $complete || what="base only, adapters: $(ls "$RUN_DIR/out/loras" 2> /dev/null | tr '\n' ' ' || true)"
    echo "pipeline packed ($what): $(ls "$OUT"/shapes.tar.part-* | wc -l) part(s) in $OUT"
fi
$complete || echo "not finished: call again while the box is warm to resume from $RUN_DIR"
