#!/usr/bin/env bash
# Time throughput variants of this tree and of an older commit in one GPU call (same machine, same clocks).
#   here, once:   mkdir -p .whl/old && git archive <COMMIT> parcae bench | tar -x -C .whl/old
#                 (and the wheels: ../shared/tools/gpu_wheels.sh); carry ".whl" in the device call
#   on the GPU:   bash bench/ab.sh 560 "new:parcae_small old:parcae_small new:gpt_medium"
# A tree name other than "new" runs from .whl/NAME (a patched copy of this tree, say .whl/sw), its outputs
# under $OUT/NAME.
# Items run in order (each: bench/train_throughput.py --exact --only VARIANT --warmup 1 --steps 3, the old ones
# from .whl/old) until fewer than 60 of the BUDGET seconds are left; every output goes to $OUT/all.log and
# each variant's table row is printed. AB_ARGS adds arguments to every run (AB_ARGS=--profile: each tree's trace
# summary in $OUT/prof_VARIANT.json and $OUT/old/prof_VARIANT.json; compare them with
# `python3 bench/profiling.py $OUT/old/prof_VARIANT.json $OUT/prof_VARIANT.json`).
site=$(mktemp -d); cur=$(mktemp)
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target $site .whl/*.whl 2>/dev/null
export PYTHONUNBUFFERED=1
# One persistent compilation cache for the call: a variant timed twice (an A/B/A/B list) compiles once; its second
# run's "compile s" is the cache read. Set JAX_COMPILATION_CACHE_DIR to keep the cache elsewhere.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
S=$(date +%s); B=$1
for item in $2; do
  tree=${item%%:*}; v=${item#*:}; left=$((B - $(date +%s) + S))
  [ $left -lt 60 ] && { echo "== skip $item (budget)"; continue; }
  echo "== $tree $v at $(( $(date +%s)-S ))s"
  if [ $tree = new ]; then
    PYTHONPATH=$site:$PWD timeout $left python3 bench/train_throughput.py --exact --only $v --warmup 1 --steps 3 $AB_ARGS 2>&1 | tee -a $OUT/all.log > $cur
  elif [ ! -d .whl/$tree ]; then
    echo "== no tree .whl/$tree for $item: make it with git archive (see the top of this script)"; continue
  else
    mkdir -p $OUT/$tree
    (cd .whl/$tree && PYTHONPATH=$site:$PWD OUT=$OUT/$tree timeout $left python3 bench/train_throughput.py --exact --only $v --warmup 1 --steps 3 $AB_ARGS 2>&1 | tee -a $OUT/all.log > $cur)
  fi
  grep -E "^$v |FAILED|Error" $cur | tail -3
done
echo "done $(( $(date +%s)-S ))s; compilation cache: $(du -sh $JAX_COMPILATION_CACHE_DIR | cut -f1) in $(ls $JAX_COMPILATION_CACHE_DIR | wc -l) entries"
