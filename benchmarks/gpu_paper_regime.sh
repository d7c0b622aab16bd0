#!/usr/bin/env bash
# Issue 19's GPU figures in one call: (a) the embedded pair, eager vs static decode, at 8k and 32k,
# batch 1 and 8; (b) Qwen2.5-0.5B -> Qwen2.5-14B (YaRN x4) at 32k and 64k, batch 1. Random weights
# built on the device from configs (benchmarks/paper_bench.py); about 7 minutes on an H100/H200. (b) also
# runs the paper's SpecKV (speckv:verify_lookahead=false) beside today's checked guess, for the check's cost
# (random weights: the draft's guesses are not accepted, so only the cost shows); (c) the same 14B pair at
# 32k with and without speculative decoding (4 proposals per target call, and auto; static step): with
# random weights nothing is accepted, so it measures what a round costs against a plain step, and the
# call costs auto decides from (bench.json's config, `speculation_costs`).
#
#   bash benchmarks/gpu_paper_regime.sh prepare    # here, once: .gpu/ (the pair's configs and tokenizer)
#                                                  # and .whl/ (transformers 5.24, regex), both git-ignored
#   bash benchmarks/gpu_paper_regime.sh run        # there: device run, carry [".gpu", ".whl"], timeout 560 s
#   bash benchmarks/gpu_paper_regime.sh rehearse   # here: the same steps on the CPU with tiny shapes
#
# It writes $OUT/bench-gpu-paper.tar.gz (every run folder and the combined report) and $OUT/bench.md;
# unpack the archive into results/bench-gpu-paper/.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
OUT=${OUT:-/tmp/bench-gpu-paper-out}
WORK=${WORK:-/tmp/bench-gpu-paper}
PAIR=(qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct)
FILES=(config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json)

case "$mode" in
  prepare)
    models=$(python -c "from draftkv.models import cache_dir; print(cache_dir() / 'models')")
    for name in "${PAIR[@]}"; do
      [ -f "$models/$name/config.json" ] || python -c "from draftkv.models import ensure_embedded; ensure_embedded('$name')"
      mkdir -p ".gpu/$name"
      for file in "${FILES[@]}"; do cp "$models/$name/$file" ".gpu/$name/"; done
    done
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl transformers==5.24.0 regex
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    du -sh .gpu .whl
    exit 0 ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src
    device=cuda; dtype=bfloat16; shrink=()
    lengths_a=8192,32768; batches_a=1,8; lengths_b=32768,65536; length_c=32768; new_tokens=32; repeats=2 ;;
  rehearse)
    device=cpu; dtype=float32
    shrink=(--override num_hidden_layers=2 --override hidden_size=64 --override intermediate_size=128
            --override num_attention_heads=4 --override num_key_value_heads=2)
    lengths_a=512,1024; batches_a=1,2; lengths_b=1024,2048; length_c=1024; new_tokens=8; repeats=1 ;;
  *)
    echo "usage: $0 prepare|run|rehearse" >&2; exit 2 ;;
esac

export PYTHONUNBUFFERED=1
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$WORK/environment.txt"
target=.gpu/${PAIR[0]}; draft=.gpu/${PAIR[1]}
common=(--device "$device" --dtype "$dtype" --new-tokens "$new_tokens" --repeats "$repeats" "${shrink[@]}")

start=$SECONDS
python3 benchmarks/paper_bench.py run --target "$target" --draft "$draft" --tokenizer "$target" --decode eager,static \
  --lengths "$lengths_a" --batch-sizes "$batches_a" --methods dense,speckv,specpc,speckv-pc "${common[@]}" --out "$WORK/a"
echo "(a) took $((SECONDS - start)) s" | tee -a "$WORK/environment.txt"

start=$SECONDS
python3 benchmarks/paper_bench.py run --target benchmarks/paper/qwen2.5-14b-instruct.json \
  --draft benchmarks/paper/qwen2.5-0.5b-instruct.json --tokenizer "$target" --decode static \
  --lengths "$lengths_b" --batch-sizes 1 --methods dense,laq,snapkv,speckv,speckv:verify_lookahead=false,specpc,speckv-pc \
  "${common[@]}" --out "$WORK/b"
echo "(b) took $((SECONDS - start)) s" | tee -a "$WORK/environment.txt"

start=$SECONDS
python3 benchmarks/paper_bench.py run --target benchmarks/paper/qwen2.5-14b-instruct.json \
  --draft benchmarks/paper/qwen2.5-0.5b-instruct.json --tokenizer "$target" --decode static \
  --lengths "$length_c" --batch-sizes 1 --methods dense,speckv --speculate 0,4,auto "${common[@]}" --out "$WORK/c"
echo "(c) took $((SECONDS - start)) s" | tee -a "$WORK/environment.txt"

python3 benchmarks/paper_bench.py report "$WORK/a-eager" "$WORK/a-static" "$WORK/b-static" "$WORK/c-static" \
  --out "$WORK/report"
cp "$WORK/report/bench.md" "$OUT/bench.md"
tar czf "$OUT/bench-gpu-paper.tar.gz" -C "$WORK" .
echo "wrote $OUT/bench-gpu-paper.tar.gz"
