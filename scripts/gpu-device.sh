#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with the binaries staged by gpu-run.sh in
# .stage/. Writes logs under $OUT (when set). Steps are chosen by $STEPS (default: all):
#   tests     release integration tests with MOE_REQUIRE_CUDA=1
#   sanitize  compute-sanitizer memcheck and racecheck on the GPU tests, fewer cases
#   sampled   sampled verification of the four model shapes
#   bench     criterion GPU benches, then the PyTorch comparison
#   verify    `moe-verify verify --gpu` (random cases, every property, reference and CUDA) and
#             `verify --gpu --shape` on two model shapes
#   dumps     tools/test_dump_experts.py: PyTorch stand-ins of the three classes write dumps,
#             `moe-verify compare` checks them
set -uo pipefail
out="${OUT:-/tmp/out}"; mkdir -p "$out"
steps="${STEPS:-tests sampled bench sanitize}"
export MOE_REQUIRE_CUDA=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
for s in $steps; do
  case "$s" in
    tests)
      echo "== tests"; (time .stage/integration gpu --test-threads 4 --nocapture) 2>&1 | tee "$out/tests.log" | grep -E "^test |test result|worst|cases|SKIP|panicked|failed" ;;
    sanitize)
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer $tool"
        MOE_GPU_CASES=24 timeout 200 compute-sanitizer --tool "$tool" --error-exitcode 9 .stage/integration \
          every_gpu_class empty_experts sizes_around compose_under four_streams every_strategy --test-threads 1 > "$out/sanitizer-$tool.log" 2>&1
        echo "exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$out/sanitizer-$tool.log" | tail -3
      done ;;
    sampled)
      echo "== sampled"; (time .stage/integration sampled_large --ignored --nocapture --test-threads 1) 2>&1 | tee "$out/sampled.log" | grep -vE "^\s*$" | tail -60 ;;
    verify)
      echo "== verify --gpu"; (time .stage/moe-verify verify --gpu --cases "${VERIFY_CASES:-300}") > "$out/verify.log" 2>&1
      echo "exit $?"; grep -vE "^\s*$" "$out/verify.log" | tail -22
      for sc in deepseek-v3:te_grouped qwen3-30b-a3b:grouped; do
        echo "== verify --gpu --shape ${sc%%:*} --class ${sc##*:}"
        .stage/moe-verify verify --gpu --shape "${sc%%:*}" --class "${sc##*:}" 2>&1 | tee -a "$out/verify-shapes.log" | tail -14
      done ;;
    dumps)
      echo "== dumps"; PYTHONUNBUFFERED=1 python3 .stage/tools/test_dump_experts.py --bin .stage/moe-verify > "$out/dumps.log" 2>&1
      echo "exit $?"; tail -20 "$out/dumps.log" ;;
    bench)
      echo "== bench"; .stage/bench --bench gpu 2>&1 | tee "$out/bench.log" | sed -n '/== GPU bench summary/,$p' 
      echo "== torch"; PYTHONUNBUFFERED=1 python3 .stage/torch_experts_bench.py 2>&1 | tee "$out/torch.log" | tail -20 ;;
  esac
done
