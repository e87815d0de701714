#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with the binaries staged by gpu-run.sh in
# .stage/. Writes logs under $OUT (when set). Steps are chosen by $STEPS (default: tests sampled
# bench sanitize):
#   tests     release integration tests with MOE_REQUIRE_CUDA=1
#   sanitize  compute-sanitizer memcheck and racecheck on the GPU tests (fp8 kernels included),
#             fewer cases
#   sampled   sampled verification of the four model shapes (the ignored tests
#             gpu::sampled_large_shapes_match_the_oracle_<shape>, bf16; DeepSeek-V3 and
#             Qwen3-30B-A3B also under blockwise fp8, ..._<shape>_fp8_blockwise)
#   bench     per-layer table: `moe-verify bench layer --rounds 12` -> $OUT/layer-rust.csv and
#             $OUT/layer-rounds.csv, then torch_experts_bench.py -> $OUT/layer-torch.csv, then
#             layer_table.py -> $OUT/layer-table.md and rounds_table.py -> $OUT/rounds-table.md
#             (printed); logs layer-bench.log, layer-torch.log. $LAYER_ARGS adds flags to the
#             bench (e.g. LAYER_ARGS="--strategy auto,loop,persistent --rounds 0");
#             $TORCH_STRATEGIES the PyTorch layers (default torch: eager; e.g.
#             TORCH_STRATEGIES=torch,torch-compile,torch-compile-act adds the torch.compile peers,
#             columns of layer-table.md).
#   fp8       the fp8 table of docs/performance.md, every row in this one call: `moe-verify bench
#             layer --class te_grouped --strategy auto --fp8 R` for R = tensorwise and blockwise
#             (our bf16 and fp8 TEGroupedMLP and the dense bf16 and fp8 rates, one process per
#             recipe) -> $OUT/fp8-rust-R.csv; torch_fp8_experts_bench.py (fp8 PyTorch peer, fwd and
#             fwdbwd, after its self-check) -> $OUT/fp8-torch-fp8.csv; torch_experts_bench.py
#             --classes TEGroupedMLP --strategies $FP8_TORCH_STRATEGIES (default
#             torch,torch-compile,torch-compile-act: eager and torch.compile bf16 peers) ->
#             $OUT/fp8-torch-bf16.csv; fp8_table.py -> $OUT/fp8-table.md (printed); logs in
#             $OUT/fp8-logs.tgz. 7 files with device.txt. $FP8_ARGS adds flags to the Rust runs
#             (e.g. FP8_ARGS="--shape mixtral"), $FP8_TORCH_ARGS to both PyTorch scripts (e.g.
#             FP8_TORCH_ARGS="--shapes mixtral").
#   grouped   GEMM-set table: `moe-verify bench grouped` -> $OUT/grouped-rust.csv,
#             torch_grouped_bench.py -> $OUT/grouped-torch.csv, grouped_table.py ->
#             $OUT/grouped-table.md (printed); $GROUPED_ARGS adds flags.
#   ab        the layer bench of the base build staged by `BASE=<rev> scripts/gpu-run.sh`
#             (.stage/base/) against this build, run base, new, new, base (default rows: auto
#             and loop, no rounds; $LAYER_ARGS applies to a base that has `moe-verify bench`
#             too), compared by layer_ab.py -> $OUT/ab.md (printed; rows slower than the
#             run-to-run noise are flagged), the CSVs and logs in $OUT/ab-raw.tgz
#   verify    `moe-verify verify --gpu` (random cases, every property, reference and CUDA) and
#             `verify --gpu --shape` on two model shapes (bf16) and DeepSeek-V3 under blockwise fp8
#   profile   per-kernel time of one layer call per row: `moe-verify bench layer --untimed`
#             under ncu (gpu__time_duration.sum) for each shape of $PROFILE_SHAPES (default
#             mixtral deepseek-v3) x GroupedMLP/TEGroupedMLP, mode $PROFILE_MODE (default
#             fwdbwd), strategy $PROFILE_STRATEGY (default auto); layer_profile.py ->
#             $OUT/profile.md (printed), raw logs in $OUT/profile-raw.tgz
#   nccl      (2+ GPUs of one host) `moe-verify verify --gpus $NCCL_GPUS` (default 2): the
#             distributed layer over NCCL, every (EP, ETP) layout, the distributed checkpoint and
#             `--time-steps 5`; then a dead worker (planted) that the launcher must name; then
#             torch_a2a_bench.py under torchrun (the same dispatch bytes) -> $OUT/nccl*.log.
#             NVLink multicast stays off (NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
#             NVSHMEM_DISABLE_NVLS=1 exported here; the launcher sets them in every worker too).
#             libnccl.so is taken from PyTorch's nvidia-nccl wheel when not on the library path.
#   dumps     tools/test_dump_experts.py: PyTorch stand-ins of the three classes write dumps,
#             `moe-verify compare` checks them; the fp8_* cases run SequentialMLP and TEGroupedMLP
#             through torch._scaled_mm (tensorwise, delayed; E4M3, HYBRID) and corrupted fp8
#             dumps must fail. $DUMP_ARGS adds flags (e.g. DUMP_ARGS="--only fp8").
# Every Rust setting is a flag of the staged binaries (`.stage/moe-verify bench layer --help`);
# the variables above only choose steps and extra flags of this script.
set -uo pipefail
out="${OUT:-/tmp/out}"; mkdir -p "$out"
steps="${STEPS:-tests sampled bench sanitize}"
export MOE_REQUIRE_CUDA=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
# logged LOG CMD...: runs CMD with stdout+stderr to LOG, prints its exit status and wall time,
# and the log's tail when it failed.
logged() {
  local log="$1"; shift
  local t0=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  echo "exit $rc after $((SECONDS - t0)) s (log: $log)"
  [ "$rc" -eq 0 ] || tail -20 "$log"
  return "$rc"
}
for s in $steps; do
  case "$s" in
    tests)
      echo "== tests"; (time .stage/integration gpu --test-threads 4 --nocapture) 2>&1 | tee "$out/tests.log" | grep -E "^test |test result|worst|cases|SKIP|panicked|failed" ;;
    sanitize)
      # The tests are selected exactly (libtest `--exact` with full test paths): substring filters
      # selected more than meant (`persistent_kernel` also matched the hybrid test, whose name
      # ends in `..._persistent_kernel`, into racecheck; `empty_experts` matched CPU tests of
      # other modules). Each log starts with libtest's `--list` of the selection, which must be
      # exactly the list below (else the step fails without running the sanitizer).
      # racecheck leaves out the hybrid test: its one large GEMM makes cuBLAS pick a 2-CTA
      # cluster kernel (nvjet_sm90_tst_128x272_64x4_2x1_v_bz_coopA_TNT) that racecheck reports
      # hazards in, for the Loop baseline's launch as much as for the hybrid's
      # (docs/gpu-validation.md); racecheck checks shared memory, and the test's own kernels
      # (the persistent kernel's launch) are the ones the persistent_kernel test covers.
      common=(
        gpu::every_gpu_class_matches_the_f64_oracle_on_random_cases
        gpu::every_gpu_class_matches_the_oracle_with_every_gemm_strategy
        gpu::empty_experts_get_exactly_zero_weight_grads_and_full_outputs
        gpu::sizes_around_tile_edges_and_single_tokens_match_the_oracle
        gpu::gpu_layers_compose_under_expert_and_tensor_parallelism
        gpu_grouped::every_strategy_matches_loop_and_reference
        gpu_grouped::persistent_kernel_matches_the_reference_on_ragged_groups
        gpu_fp8::segmented_current_scaling_matches_the_reference_per_segment
        gpu_fp8::delayed_scaling_casts_records_and_updates_like_the_reference
        gpu_fp8::fused_activation_quantization_equals_the_quantizer_on_its_output
        gpu_fp8::segmented_block_quantizer_equals_the_per_segment_quantizer
        gpu_fp8::fp8_grouped_gemm_equals_the_exact_product_on_exact_operands
      )
      hybrid=gpu_grouped::hybrid_strategy_runs_large_experts_on_cublas_and_the_rest_on_the_persistent_kernel
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer $tool"
        tests=("${common[@]}")
        # memcheck also runs the fp8 layers (quantization kernels, cuBLASLt fp8 GEMMs issued
        # directly and as captured graphs); racecheck keeps to the fp8 quantization kernels
        # (segmented, delayed, fused-activation and segmented-block tests above, every quantizer
        # incl. the block and MXFP8 ones below), as it keeps away from the cuBLAS(Lt) cluster
        # kernels.
        if [ "$tool" = memcheck ]; then
          tests+=("$hybrid" gpu_fp8::fp8_zero_token_experts_get_exactly_zero_weight_grads
            gpu_fp8::fp8_gemm_issue_ways_compute_the_same_bits)
        else
          tests+=(gpu_fp8::quantizers_match_the_reference_bit_for_bit)
        fi
        log="$out/sanitizer-$tool.log"
        echo "selected tests (.stage/integration --exact --list):" > "$log"
        .stage/integration "${tests[@]}" --exact --list >> "$log" 2>&1
        if ! diff <(printf '%s\n' "${tests[@]}" | sort) <(sed -n 's/: test$//p' "$log" | sort) > /dev/null; then
          echo "exit 2: the selection is not exactly the ${#tests[@]} tests meant:"; cat "$log"
          continue
        fi
        echo "${#tests[@]} tests selected (list in $log)"
        PROPTEST_CASES=24 timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 9 .stage/integration \
          "${tests[@]}" --exact --test-threads 1 >> "$log" 2>&1
        echo "exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$log" | tail -3
      done ;;
    sampled)
      echo "== sampled"; (time .stage/integration sampled_large --ignored --nocapture --test-threads 1) 2>&1 | tee "$out/sampled.log" | grep -vE "^\s*$" | tail -60 ;;
    verify)
      echo "== verify --gpu"; (time .stage/moe-verify verify --gpu --cases "${VERIFY_CASES:-300}") > "$out/verify.log" 2>&1
      echo "exit $?"; grep -vE "^\s*$" "$out/verify.log" | tail -22
      for sc in deepseek-v3:te_grouped:none qwen3-30b-a3b:grouped:none deepseek-v3:te_grouped:blockwise; do
        IFS=: read -r sh cl rc <<< "$sc"
        echo "== verify --gpu --shape $sh --class $cl --fp8-recipe $rc"
        .stage/moe-verify verify --gpu --shape "$sh" --class "$cl" --fp8-recipe "$rc" 2>&1 | tee -a "$out/verify-shapes.log" | tail -14
      done ;;
    nccl)
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      if ! ldconfig -p | grep -q 'libnccl.so '; then
        nl=$(python3 -c "import glob,site;print(sorted(sum([glob.glob(p+'/nvidia/nccl/lib/libnccl.so*') for p in site.getsitepackages()],[]))[0])")
        mkdir -p /tmp/moe-nccl && ln -sf "$nl" /tmp/moe-nccl/libnccl.so && export LD_LIBRARY_PATH="/tmp/moe-nccl:${LD_LIBRARY_PATH:-}"
      fi
      n="${NCCL_GPUS:-2}"
      echo "== verify --gpus $n"; (time .stage/moe-verify verify --gpus "$n" --time-steps 5) 2>&1 | tee "$out/nccl.log"
      echo "== dead worker (planted): the launcher must name rank 1"
      .stage/moe-verify verify --gpus "$n" --planted-fault die --fault-rank 1 --collective-timeout-s 5 --run-timeout-s 60 2>&1 | tail -3 | tee "$out/nccl-fault.log"
      bytes=$(grep -oE 'all_to_all of [0-9]+ bytes' "$out/nccl.log" | grep -oE '[0-9]+' | head -1)
      [ -n "$bytes" ] && torchrun --standalone --nproc-per-node "$n" .stage/torch_a2a_bench.py "$bytes" 5 2>&1 | grep -v '^W' | tail -2 | tee "$out/nccl-torch.log" ;;
    profile)
      prof=/tmp/moe-profile; rm -rf "$prof"; mkdir -p "$prof"; specs=()
      for sh in ${PROFILE_SHAPES:-mixtral deepseek-v3}; do
        for cl in grouped te_grouped; do
          echo "== ncu layer calls: $sh $cl ${PROFILE_MODE:-fwdbwd} ${PROFILE_STRATEGY:-auto}"
          cname=GroupedMLP; [ "$cl" = te_grouped ] && cname=TEGroupedMLP
          timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
            --log-file "$prof/$sh-$cl.csv" .stage/moe-verify bench layer --untimed --shape "$sh" --class "$cl" \
            --mode "${PROFILE_MODE:-fwdbwd}" --strategy "${PROFILE_STRATEGY:-auto}" > "$prof/$sh-$cl.log" 2>&1
          echo "exit $?"
          specs+=("$prof/$sh-$cl.csv:$sh:$cname:${PROFILE_MODE:-fwdbwd}")
        done
      done
      python3 .stage/layer_profile.py --counts .stage/shapes.json "${specs[@]}" > "$out/profile.md"
      echo "exit $?"; cat "$out/profile.md"
      tar czf "$out/profile-raw.tgz" -C "$prof" . ;;
    dumps)
      # shellcheck disable=SC2086 # DUMP_ARGS is a list of flags
      echo "== dumps"; PYTHONUNBUFFERED=1 python3 .stage/tools/test_dump_experts.py --bin .stage/moe-verify ${DUMP_ARGS:-} > "$out/dumps.log" 2>&1
      echo "exit $?"; tail -20 "$out/dumps.log" ;;
    bench)
      echo "== layer bench (Rust) ${LAYER_ARGS:-}"
      # shellcheck disable=SC2086 # LAYER_ARGS is a list of flags
      logged "$out/layer-bench.log" .stage/moe-verify bench layer --rounds 12 --csv "$out/layer-rust.csv" \
        --rounds-csv "$out/layer-rounds.csv" ${LAYER_ARGS:-}
      grep -E "^ERR|^TFLOP/s dense " "$out/layer-bench.log" | head -40
      echo "== layer bench (torch)"
      logged "$out/layer-torch.log" env PYTHONUNBUFFERED=1 python3 .stage/torch_experts_bench.py \
        --counts .stage/shapes.json --strategies "${TORCH_STRATEGIES:-torch}" --csv "$out/layer-torch.csv"
      grep -E "^torch |^ERR|TFLOP/s dense " "$out/layer-torch.log" | head -40
      echo "== layer table"
      python3 .stage/layer_table.py "$out/layer-rust.csv" "$out/layer-torch.csv" > "$out/layer-table.md"
      echo "exit $?"; cat "$out/layer-table.md"
      if [ "$(wc -l < "$out/layer-rounds.csv" 2>/dev/null || echo 0)" -gt 1 ]; then  # rows past the header
        echo "== interleaved rounds table"
        python3 .stage/rounds_table.py "$out/layer-rounds.csv" "$out/layer-torch.csv" > "$out/rounds-table.md"
        echo "exit $?"; cat "$out/rounds-table.md"
      fi ;;
    fp8)
      f8=/tmp/moe-fp8; rm -rf "$f8"; mkdir -p "$f8"
      # The logs are tarred after each part, so a call cut short still brings back what ran.
      keep_logs() { tar czf "$out/fp8-logs.tgz" -C "$f8" .; }
      for recipe in tensorwise blockwise; do
        echo "== layer bench (Rust): TEGroupedMLP auto + fp8 $recipe ${FP8_ARGS:-}"
        # shellcheck disable=SC2086 # FP8_ARGS is a list of flags
        logged "$f8/fp8-rust-$recipe.log" .stage/moe-verify bench layer --class te_grouped --strategy auto \
          --fp8 "$recipe" --csv "$out/fp8-rust-$recipe.csv" ${FP8_ARGS:-}
        grep -E "^ERR|^TFLOP/s dense " "$f8/fp8-rust-$recipe.log" | head -20
        keep_logs
      done
      echo "== PyTorch fp8 peer (fwd, fwdbwd) ${FP8_TORCH_ARGS:-}"
      # shellcheck disable=SC2086 # FP8_TORCH_ARGS is a list of flags
      logged "$f8/fp8-torch-fp8.log" env PYTHONUNBUFFERED=1 python3 .stage/torch_fp8_experts_bench.py \
        --counts .stage/shapes.json --csv "$out/fp8-torch-fp8.csv" ${FP8_TORCH_ARGS:-}
      grep -E "^SELF-CHECK|^FALLBACK|^ERR" "$f8/fp8-torch-fp8.log" | cut -c1-400 | head -20
      keep_logs
      echo "== PyTorch bf16 peers: ${FP8_TORCH_STRATEGIES:-torch,torch-compile,torch-compile-act} ${FP8_TORCH_ARGS:-}"
      # shellcheck disable=SC2086 # FP8_TORCH_ARGS is a list of flags
      logged "$f8/fp8-torch-bf16.log" env PYTHONUNBUFFERED=1 python3 .stage/torch_experts_bench.py \
        --counts .stage/shapes.json --classes TEGroupedMLP \
        --strategies "${FP8_TORCH_STRATEGIES:-torch,torch-compile,torch-compile-act}" \
        --csv "$out/fp8-torch-bf16.csv" ${FP8_TORCH_ARGS:-}
      grep -E "^ERR" "$f8/fp8-torch-bf16.log" | cut -c1-400 | head -20
      keep_logs
      echo "== fp8 table"
      csvs=()
      for c in "$out"/fp8-rust-tensorwise.csv "$out"/fp8-rust-blockwise.csv "$out"/fp8-torch-bf16.csv "$out"/fp8-torch-fp8.csv; do
        [ -s "$c" ] && csvs+=("$c")
      done
      python3 .stage/fp8_table.py "${csvs[@]}" > "$out/fp8-table.md"
      echo "exit $?"; cat "$out/fp8-table.md" ;;
    grouped)
      echo "== grouped GEMM sets (Rust)"
      # shellcheck disable=SC2086 # GROUPED_ARGS is a list of flags
      logged "$out/grouped-bench.log" .stage/moe-verify bench grouped --csv "$out/grouped-rust.csv" ${GROUPED_ARGS:-}
      grep -E "^ERR|^ROW,rust,dense" "$out/grouped-bench.log" | head -40
      echo "== grouped GEMM sets (torch)"
      logged "$out/grouped-torch.log" env PYTHONUNBUFFERED=1 python3 .stage/torch_grouped_bench.py \
        --counts .stage/shapes.json --csv "$out/grouped-torch.csv"
      grep -E "^torch |^ERR|^ROW,torch,dense" "$out/grouped-torch.log" | head -40
      echo "== grouped table"
      python3 .stage/grouped_table.py "$out/grouped-rust.csv" "$out/grouped-torch.csv" > "$out/grouped-table.md"
      echo "exit $?"; cat "$out/grouped-table.md" ;;
    ab)
      # The base build: .stage/base/moe-verify with a `bench layer` command, or (a build from
      # before it) .stage/base/bench, the criterion bench binary configured by MOE_LAYER_*.
      ab=/tmp/moe-ab; rm -rf "$ab"; mkdir -p "$ab"
      base_run() { # $1 = CSV
        if .stage/base/moe-verify bench layer --help > /dev/null 2>&1; then
          # shellcheck disable=SC2086
          .stage/base/moe-verify bench layer --csv "$1" ${LAYER_ARGS:-}
        else
          MOE_LAYER_CSV="$1" .stage/base/bench --bench gpu_layer
        fi
      }
      # shellcheck disable=SC2086
      new_run() { .stage/moe-verify bench layer --csv "$1" ${LAYER_ARGS:-}; }
      for run in base:A1 new:B1 new:B2 base:A2; do
        echo "== layer bench ${run%%:*} (${run##*:})"
        logged "$ab/${run##*:}.log" "${run%%:*}_run" "$ab/${run##*:}.csv"
      done
      python3 .stage/layer_ab.py "$ab/A1.csv" "$ab/B1.csv" "$ab/B2.csv" "$ab/A2.csv" > "$out/ab.md"
      echo "exit $?"; cat "$out/ab.md"
      tar czf "$out/ab-raw.tgz" -C "$ab" . ;;
  esac
done
