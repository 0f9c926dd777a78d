#!/usr/bin/env bash
# What one device call checks and measures (device time is scarce; a machine start costs minutes), in stages:
#   STAGES="tests kernels attention gemv decode throughput" bash benchmarks/run_on_gpu.sh    (default: tests decode)
# tests: the gpu-marked tests (PYTEST_ARGS narrows them); profile: profile_step.py (host vs GPU per decode step,
# prefill; PROFILE_ARGS="--quantization fp8" profiles a quantized step); kernels/attention/gemv: W5 benchmarks; decode: W1 (MODELS="llama2_7b ...", PROVIDERS="fastllm ...")
# then, if llama2_7b is among MODELS, W3 warm start of Llama-2-7B in a second process; throughput: W2/W4 (Llama-3.1-8B, 1000 requests fixed and
# mixed, HF continuous batching beside the fixed set; THROUGHPUT_ARGS adds options, e.g. "--providers fastllm
# fastllm_sync hf_continuous_batching"). Rough durations on an H100: tests 4.6 min, profile 1.5,
# decode 4 per model with all providers, throughput 5.
# quant: W5-quant-gemv (QUANT_GEMV_ARGS="--sweep" adds the launch-setting sweeps) and W1-quant (fp8, int8, int4
# beside bf16; ~5 min); throughput-fp8: W2-fp8 beside W2 bf16 in the same call (~2 min).
# rows: what a batch-1 decode step runs (1 row; 2 before the 1-row graph): W5-gemv at 1 and 2 rows, the fused
# chain at 1 and 2 rows, and W1 without the 1-row decode graph and without decode_act_fusion beside the default and gpt-fast
# (carry .anchors; ~7 min).
# defaults: the GPU tests of the kernels whose signatures changed after the last GPU run of 2026-11-30 (decode
# attention, RMSNorm, activations, split-K reduce, the quantize kernel, int4) and the runtime's parity with CUDA graphs
# (the slowest parity tests left out), 9.5 min on an H200 (2026-11-30: 340 passed, 2 xfailed).
# optin: decode_attention_with_rotary (paged_attention.FUSE_ROTARY_INTO_DECODE, off: measured no faster on
# 2026-11-30): its GPU tests, then W1 of both shapes with it beside the default in the same call (~6 min);
# optin-w2: W2-fp8 with the opt-in fp8_input_quant pass beside the defaults, and its GPU tests (~5 min).
# int4packed: the int4 decode kernel's one-row loop in packed bf16x2 math (quant_linear.INT4_PACKED_BF16, inline
# PTX; on since 2026-11-30): every int4 GPU test, W5-quant-gemv of int4 packed and fp32 beside tinygemm
# (QUANT_GEMV_ARGS=--sweep adds the loops' launch-setting sweep, ~2 min), W1-int4 with the packed and the fp32 loop
# (INT4_SETTINGS: bench_quant's kernel settings run beside the default; INT4_TESTS: the pytest -k expression).
# int4prefill: int4 past 16 rows, the dequantizing GEMM against the weight dequantized by a kernel then cuBLAS
# (quant_linear.INT4_DEQUANT_MIN_ROWS): their GPU tests, bench_quant_gemv --prefill (128, 512, 2048 rows), W1-int4's
# TTFT (~5 min, estimated).
# int4act: the opt-in int4_act_fusion pass (SiLU * up stored by the int4 gate-up GEMV's epilogue): its GPU tests, then
# W1-int4 with and without it in one call (~1.5 min; 2026-11-30: 17 passed, 355.3 against 380.4 tok/s: stays opt-in).
# fp8pass: W1-fp8 with the opt-in fp8_input_quant pass beside the defaults (bf16 in the same call; ~3 min).
# int4chunks: what 2026-12-01's chunks of several groups (quant_linear.INT4_CHUNK_GROUPS, one row: on) left unmeasured:
# their GPU tests (two rows and the dot form's INT4_DOT_CHUNK_GROUPS too), then bench_quant_gemv --int4-chunk-groups at
# 2 and 8 rows (the packed loop's and the dot form's sweeps; ~2.5 min; run 2026-12-02: two rows now take chunks of two
# groups, INT4_TWO_ROW_CHUNK_GROUPS; the dot form keeps one group, at least 2 K splits).
# (int4next, the dot form reading words, ran on 2026-11-30: no faster at one row, slower at 8: -int4next.json.)
# programs: the decode GEMVs' K splits aiming at more programs an SM in the step (int4 gained 2.5% so on 2026-12-02:
# quant_linear.INT4_ONE_ROW_PROGRAMS_PER_SM): the bf16 decode graph's replay A/B with skinny_gemm._PROGRAMS_PER_SM at
# 4 and 8 beside the default 2 for both shapes, then W1-fp8 (and bf16) with each in one call (~8 min, estimated).
# blockfp8: block-scaled FP8 prefill with the weight dequantized by one kernel (quant_linear.BLOCK_FP8_DEQUANT_KERNEL,
# off: written 2026-12-02, interpreter-checked only): its GPU tests, then bench_quant_gemv --prefill (the PyTorch
# dequantization, the block GEMM and the kernel at 128 / 512 / 2048 rows, int4's beside; ~3 min, estimated).
# tests-kernels, tests-quant, tests-runtime: the whole `pytest -m gpu` in three calls that each fit the device's 10-minute
# limit with a machine start (in one, it does not: on 2026-12-02 the kernel, quantization and PDL files ran 663 tests
# in ~9.5 min and were cut there at 91%): tests/test_kernel_*.py; test_gpu_quantization, test_int4_gated_linear,
# test_gpu_pdl; every other file with gpu tests (engine, memory, parity, start-up, graph cache, engine process, CLI).
# Each stops at 540 s (what ran is in its log).
# keys-before-wait: the decode attention loading its first key tile before its PDL wait
# (paged_attention._DECODE_KEYS_BEFORE_WAIT, on with PDL): the attention GPU tests, then the bf16 decode graph's
# replay A/B against it off for both shapes (~5 min, estimated).
# deferred-norm: the skinny GEMM's deferred RMSNorm (fused_linear prologue "rms_norm_deferred"): its GPU tests and the
# GEMM files', bench_deferred_norm (a layer's decode GEMMs with the norms deferred against the default chain, both
# shapes), then the decode graph's replay A/B with rotary and the KV write inside decode attention
# (paged_attention.FUSE_ROTARY_INTO_DECODE) beside the default, both shapes (~6 min, estimated).
# decode-tails: bench_deferred_norm (with its rows-a-program sweep), then the bf16 decode graph's replay A/B, both
# shapes, of 32-key decode tiles (~3 min).
# act-down: the down projection reading SiLU(gate) * up under other launch settings (fused_linear.ACT_PROLOGUE_*,
# skinny_gemm.PDL_WITH_GATED_PROLOGUE): its GPU tests, bench_act_down (the gate-up + down pair per layer, both shapes),
# then the bf16 decode graph's replay A/B with each shape's fastest variant beside the default (~4 min, estimated).
# folded-norm: the deferred RMSNorm with its weight folded into the consumer's W (fused_linear prologue
# "rms_scale_deferred"): its GPU tests and the deferred norm's, then bench_deferred_norm with the folded chain and
# consumers beside the default and deferred ones, both shapes (~3 min, estimated).
# folded-pass: decode_fusion with the norms' weights folded into the GEMMs (decode_fusion.NORM_PROLOGUE
# "rms_scale_deferred"): its GPU tests (kernel, runtime parity with CUDA graphs), then the bf16 decode graph's replay
# A/B beside the defaults (4 and 16 rows of W a program), both shapes (~5 min, estimated).
# deferred-pass: decode_fusion with the deferred norm (decode_fusion.NORM_PROLOGUE "rms_norm_deferred", 4 / 8 / 16 rows
# of W a program): its GPU tests (kernel, runtime parity with CUDA graphs), then the bf16 decode graph's replay A/B
# beside the defaults, both shapes (~4 min, estimated).
# deferred-rows: bench_deferred_norm with its per-GEMV timings (QKV and gate-up with the deferred norm at 4 / 8 / 16
# rows of W a program beside the norm kernel + GEMV, both shapes): why 16 rows paid on the 8B shape only (~1.5 min).
# tf-latest: test_gpu_parity.py (every family with CUDA graphs; 16-bit against fp32) under the transformers that CI
# installs (newer than the device's): carry .whl-tf, that transformers' wheel and the ones it needs newer than the
# device has (for the device's Python 3.12: `pip download --no-deps --python-version 3.12 --only-binary=:all:`
# transformers, huggingface_hub, httpx2, httpcore2, kernels, tomlkit, truststore, hf_xet, click, regex, idna, anyio;
# ~22 MB), installed into /tmp/tf-latest ahead of the device's packages for this stage only (~4 min, estimated).
# ATTENTION_ARGS="--sweep" adds the decode kernel's launch-setting sweep to the attention stage (~3 min more).
# Logs and JSON results go to $OUT (copy the JSON into benchmarks/results/ and run benchmarks/summarize.py).
# Carry .whl (pytest, pluggy, iniconfig wheels) where the machine lacks pytest.
set -uo pipefail
OUT=${OUT:-/tmp/fastllm-gpu-out}
STAGES=${STAGES:-tests decode}
MODELS=${MODELS:-llama2_7b llama31_8b}
mkdir -p "$OUT"
if ! python3 -c "import pytest, xdist" 2>/dev/null && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0
# A stage's GPU tests: gpu_tests NAME SECONDS PYTEST_ARGS... (0 seconds: no time limit); the log goes to
# $OUT/gpu-NAME-tests.log, the summary lines are printed, a failure sets rc.
gpu_tests() {
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 -m pytest -m gpu -q -p no:cacheprovider "$@" > "$OUT/gpu-$name-tests.log" 2>&1 || rc=1
    grep -E "passed|failed|^FAILED" "$OUT/gpu-$name-tests.log" | tail -n 15
}
# GPU_TEST_WORKERS=N: the kernel and quantization stages' tests in N pytest-xdist processes sharing the GPU (carry
# the pytest-xdist and execnet wheels in .whl). Their time is mostly Triton compiling kernel variants, one CPU core
# each; the machine has 16. With 8 on an H200 (2026-12-02): the kernel stage's 445 tests in 87 s, the quantization
# stage's 262 (+ 2 xfailed) in 67-121 s, so both fit one call. The runtime stage stays in one process: its tests
# reserve most of the GPU's memory for KV caches and measure what is freed (~6.5 min alone).
workers=()
if [ -n "${GPU_TEST_WORKERS:-}" ] && python3 -c "import xdist" 2>/dev/null; then
    workers=(-n "$GPU_TEST_WORKERS" --dist load)
fi
for stage in $STAGES; do
    case $stage in
        tests) python3 -m pytest -m gpu -q -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/gpu-tests.log" 2>&1 || rc=1
               grep -E "passed|failed|^FAILED" "$OUT/gpu-tests.log" | tail -n 15 ;;
        tests-kernels) gpu_tests kernels 540 "${workers[@]}" tests/test_kernel_*.py ;;
        tests-quant) gpu_tests quant 540 "${workers[@]}" tests/test_gpu_quantization.py tests/test_int4_gated_linear.py \
                         tests/test_gpu_pdl.py ;;
        tests-runtime) gpu_tests runtime 540 --continue-on-collection-errors tests/test_gpu_engine.py \
                           tests/test_gpu_memory.py tests/test_gpu_parity.py tests/test_gpu_startup.py \
                           tests/test_graph_cache.py tests/test_engine_process.py tests/test_cli_bench.py \
                           tests/test_layer_stamp.py ;;
        tf-latest) if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tf-latest .whl-tf/*.whl \
                         > "$OUT/tf-latest-install.log" 2>&1; then
                       (export PYTHONPATH="/tmp/tf-latest:$PYTHONPATH"
                        python3 -c "import transformers; print('transformers', transformers.__version__)"
                        gpu_tests tf-latest 540 tests/test_gpu_parity.py; exit $rc) || rc=1
                   else
                       rc=1; tail -n 5 "$OUT/tf-latest-install.log"
                   fi ;;
        kernels) python3 benchmarks/bench_kernels.py --out "$OUT" > "$OUT/kernels.log" 2>&1 || rc=1 ;;
        attention) python3 benchmarks/bench_attention.py ${ATTENTION_ARGS:-} --out "$OUT" > "$OUT/attention.log" 2>&1 || rc=1
                   tail -n 20 "$OUT/attention.log" ;;
        gemv) python3 benchmarks/bench_gemv.py --out "$OUT" > "$OUT/gemv.log" 2>&1 || rc=1 ;;
        throughput) python3 benchmarks/bench_throughput.py --out "$OUT" ${THROUGHPUT_ARGS:-} > "$OUT/throughput.log" 2>&1 || rc=1
                    tail -n 6 "$OUT/throughput.log" ;;
        profile) python3 benchmarks/profile_step.py --model ${PROFILE_MODEL:-llama2_7b} ${PROFILE_ARGS:-} --out "$OUT" \
                     > "$OUT/profile.log" 2>&1 || rc=1
                 grep -v Warn "$OUT/profile.log" | tail -n 24 ;;
        decode) python3 benchmarks/bench_decode.py --models $MODELS --providers ${PROVIDERS:-hf_eager hf_static_compile fastllm} --out "$OUT" > "$OUT/decode.log" 2>&1 || rc=1
                grep -vE "capturing|warn" "$OUT/decode.log" | tail -n 8
                if [[ " $MODELS " == *" llama2_7b "* ]]; then  # W3 is Llama-2-7B, warm after its cold start above
                    python3 benchmarks/bench_decode.py --warm-startup llama2_7b --out "$OUT" >> "$OUT/decode.log" 2>&1 || rc=1
                    grep "startup warm" "$OUT/decode.log"
                fi ;;
        quant) python3 benchmarks/bench_quant_gemv.py ${QUANT_GEMV_ARGS:-} --out "$OUT" > "$OUT/quant-gemv.log" 2>&1 || rc=1
               python3 benchmarks/bench_quant.py --out "$OUT" > "$OUT/quant.log" 2>&1 || rc=1
               grep -E "tok/s" "$OUT/quant.log" ;;
        throughput-fp8) python3 benchmarks/bench_throughput.py --providers fastllm --workloads fixed --quantization fp8 \
                            --bf16-baseline --out "$OUT" > "$OUT/throughput-fp8.log" 2>&1 || rc=1
                        grep -E "^fastllm" "$OUT/throughput-fp8.log" | cut -c1-200 ;;
        rows) python3 benchmarks/bench_gemv.py --quick --rows 1 2 --out "$OUT" > "$OUT/gemv-rows.log" 2>&1 || rc=1
              (cd benchmarks && python3 bench_fused_linear.py --rows 1 2 --out "$OUT") > "$OUT/fused-rows.log" 2>&1 || rc=1
              tail -n 12 "$OUT/fused-rows.log"
              python3 benchmarks/bench_decode.py --models llama31_8b --providers fastllm fastllm_two_row \
                  fastllm_no_act_fusion gptfast --out "$OUT" > "$OUT/decode-rows.log" 2>&1 || rc=1
              grep -vE "capturing|warn" "$OUT/decode-rows.log" | tail -n 6 ;;
        defaults) gpu_tests defaults 0 tests/test_kernel_paged_attention.py tests/test_kernel_rms_norm.py \
                      tests/test_kernel_act_and_mul.py tests/test_kernel_skinny_gemm.py tests/test_gpu_quantization.py \
                      tests/test_gpu_pdl.py tests/test_gpu_parity.py \
                      -k "not fp32_greedy and not teacher_forced and not as_close" ;;
        optin) gpu_tests optin 0 tests/test_kernel_decode_rotary.py tests/test_gpu_quantization.py -k "rotary or fusion"
               python3 benchmarks/bench_decode.py --models llama31_8b llama2_7b --providers fastllm \
                   fastllm_fused_decode_rotary --out "$OUT" > "$OUT/decode-optin.log" 2>&1 || rc=1
               grep -vE "capturing|warn" "$OUT/decode-optin.log" | tail -n 6 ;;
        optin-w2) gpu_tests optin-w2 0 tests/test_kernel_fp8_input_linear.py
                  python3 benchmarks/bench_throughput.py --providers fastllm --workloads fixed --quantization fp8 \
                      --settings default passes+=fp8_input_quant --out "$OUT" > "$OUT/throughput-optin.log" 2>&1 || rc=1
                  grep -E "^fastllm" "$OUT/throughput-optin.log" | cut -c1-200 ;;
        int4packed) gpu_tests int4packed 400 tests/test_gpu_quantization.py -k "${INT4_TESTS:-int4}"
                    python3 benchmarks/bench_quant_gemv.py --schemes int4 int4_fp32 tinygemm_int4 ${QUANT_GEMV_ARGS:-} \
                        --out "$OUT" > "$OUT/quant-gemv-int4packed.log" 2>&1 || rc=1
                    grep -E "int4" "$OUT/quant-gemv-int4packed.log" | tail -n 24
                    python3 benchmarks/bench_quant.py --schemes int4 --kernel-settings ${INT4_SETTINGS:-int4_fp32_loop} \
                        --out "$OUT" \
                        > "$OUT/quant-int4packed.log" 2>&1 || rc=1
                    grep -E "tok/s" "$OUT/quant-int4packed.log" ;;
        int4prefill) gpu_tests int4prefill 200 tests/test_gpu_quantization.py -k "dequantize or llama_shapes"
                     python3 benchmarks/bench_quant_gemv.py --schemes int4 --prefill --out "$OUT" \
                         > "$OUT/quant-gemv-int4prefill.log" 2>&1 || rc=1
                     grep -E "_m(128|512|2048)_(int4|cublas)" "$OUT/quant-gemv-int4prefill.log"
                     python3 benchmarks/bench_quant.py --schemes int4 --out "$OUT" > "$OUT/quant-int4prefill.log" 2>&1 \
                         || rc=1
                     grep -E "tok/s" "$OUT/quant-int4prefill.log" ;;
        int4act) gpu_tests int4act 300 tests/test_int4_gated_linear.py
                 python3 benchmarks/bench_quant.py --schemes int4 --pass-variants int4_act_fusion --out "$OUT" \
                     > "$OUT/quant-int4act.log" 2>&1 || rc=1
                 grep -E "tok/s" "$OUT/quant-int4act.log" ;;
        int4chunks) gpu_tests int4chunks 300 tests/test_gpu_quantization.py tests/test_int4_gated_linear.py \
                        -k "chunk or packed or gated_epilogue_equals"
                    python3 benchmarks/bench_quant_gemv.py --schemes int4 --rows 2 8 --int4-chunk-groups 1 2 4 \
                        --out "$OUT" > "$OUT/quant-gemv-int4chunks.log" 2>&1 || rc=1
                    grep -E "best|_m(2|8)_int4" "$OUT/quant-gemv-int4chunks.log" | tail -n 16 ;;
        programs) for model in llama31_8b llama2_7b; do
                      python3 benchmarks/replay_ab.py --model $model --without '' --prompt 256 \
                          --setting p4=fastllm.kernels.skinny_gemm._PROGRAMS_PER_SM=4 \
                          --setting p8=fastllm.kernels.skinny_gemm._PROGRAMS_PER_SM=8 --out "$OUT" \
                          > "$OUT/replay-programs-$model.log" 2>&1 || rc=1
                      tail -n 4 "$OUT/replay-programs-$model.log"
                  done
                  python3 benchmarks/bench_quant.py --schemes fp8 --kernel-settings skinny_programs4 skinny_programs8 \
                      --out "$OUT" > "$OUT/quant-programs.log" 2>&1 || rc=1
                  grep -E "tok/s" "$OUT/quant-programs.log" ;;
        blockfp8) gpu_tests blockfp8 300 tests/test_gpu_quantization.py -k "block"
                  python3 benchmarks/bench_quant_gemv.py --schemes fp8 --prefill --out "$OUT" \
                      > "$OUT/quant-gemv-blockfp8.log" 2>&1 || rc=1
                  grep -E "_m(128|512|2048)_(fp8|cublas)" "$OUT/quant-gemv-blockfp8.log" ;;
        keys-before-wait) gpu_tests keys-before-wait 300 "${workers[@]}" tests/test_kernel_decode_keys_before_wait.py \
                              tests/test_kernel_paged_attention.py tests/test_kernel_decode_rotary.py \
                              tests/test_kernel_decode_min_tiles.py
                          for model in llama2_7b llama31_8b; do
                              python3 benchmarks/replay_ab.py --model $model --without '' --prompt 256 --rounds 3 \
                                  --setting off=fastllm.kernels.paged_attention._DECODE_KEYS_BEFORE_WAIT=False \
                                  --out "$OUT" > "$OUT/replay-keys-before-wait-$model.log" 2>&1 || rc=1
                              tail -n 3 "$OUT/replay-keys-before-wait-$model.log"
                          done ;;
        deferred-norm) gpu_tests deferred-norm 300 "${workers[@]}" tests/test_kernel_deferred_norm.py \
                           tests/test_kernel_fused_linear.py tests/test_kernel_skinny_gemm.py
                       python3 benchmarks/bench_deferred_norm.py --out "$OUT" > "$OUT/deferred-norm.log" 2>&1 || rc=1
                       tail -n 5 "$OUT/deferred-norm.log"
                       for model in llama2_7b llama31_8b; do
                           python3 benchmarks/replay_ab.py --model $model --without '' --prompt 256 --rounds 3 \
                               --setting rotary_in_decode=fastllm.kernels.paged_attention.FUSE_ROTARY_INTO_DECODE=True \
                               --out "$OUT" > "$OUT/replay-rotary-in-decode-$model.log" 2>&1 || rc=1
                           tail -n 3 "$OUT/replay-rotary-in-decode-$model.log"
                       done ;;
        decode-tails) python3 benchmarks/bench_deferred_norm.py --out "$OUT" > "$OUT/deferred-norm.log" 2>&1 || rc=1
                      tail -n 6 "$OUT/deferred-norm.log"
                      for model in llama2_7b llama31_8b; do
                          # (2026-12-02 it also ran wave15=skinny_gemm._ONE_WAVE_FIT=1.5, with and without
                          # _ONE_WAVE_EXTRA_STAGES=0: slower, removed)
                          python3 benchmarks/replay_ab.py --model $model --without '' --prompt 256 --rounds 3 \
                              --setting decode32=fastllm.kernels.paged_attention._DECODE_BLOCK_N=32 \
                              --out "$OUT" > "$OUT/replay-decode-tails-$model.log" 2>&1 || rc=1
                          tail -n 5 "$OUT/replay-decode-tails-$model.log"
                      done ;;
        deferred-pass) gpu_tests deferred-pass 200 tests/test_kernel_deferred_norm.py tests/test_gpu_parity.py \
                           -k "deferred or llama_shapes or fp8_weights"
                       for model in llama2_7b llama31_8b; do
                           python3 benchmarks/replay_ab.py --model $model --without '' --prompt 256 --rounds 3 \
                               --setting deferred=+decode_fusion,fastllm.passes.decode_fusion.NORM_PROLOGUE=\'rms_norm_deferred\' \
                               --setting deferred8=+decode_fusion,fastllm.passes.decode_fusion.NORM_PROLOGUE=\'rms_norm_deferred\',fastllm.kernels.fused_linear.DEFERRED_NORM_BLOCK_N=8 \
                               --setting deferred16=+decode_fusion,fastllm.passes.decode_fusion.NORM_PROLOGUE=\'rms_norm_deferred\',fastllm.kernels.fused_linear.DEFERRED_NORM_BLOCK_N=16 \
                               --out "$OUT" > "$OUT/replay-deferred-$model.log" 2>&1 || rc=1
                           tail -n 5 "$OUT/replay-deferred-$model.log"
                       done ;;
        deferred-rows) python3 benchmarks/bench_deferred_norm.py --out "$OUT" > "$OUT/deferred-rows.log" 2>&1 || rc=1
                       tail -n 10 "$OUT/deferred-rows.log" ;;
        act-down) gpu_tests act-down 200 "${workers[@]}" tests/test_kernel_fused_linear.py -k "act_prologue or silu"
                  python3 benchmarks/bench_act_down.py --out "$OUT" > "$OUT/act-down.log" 2>&1 || rc=1
                  tail -n 16 "$OUT/act-down.log"
                  for model in llama2_7b llama31_8b; do
                      best=$(cat "$OUT/best-act-down-$model.txt" 2>/dev/null)
                      [ -n "$best" ] || continue
                      python3 benchmarks/replay_ab.py --model $model --without '' --prompt 256 --rounds 3 \
                          --setting "best=$best" --out "$OUT" > "$OUT/replay-act-down-$model.log" 2>&1 || rc=1
                      tail -n 3 "$OUT/replay-act-down-$model.log"
                  done ;;
        folded-norm) gpu_tests folded-norm 200 "${workers[@]}" tests/test_kernel_deferred_norm.py
                     python3 benchmarks/bench_deferred_norm.py --out "$OUT" > "$OUT/folded-norm.log" 2>&1 || rc=1
                     tail -n 16 "$OUT/folded-norm.log" ;;
        folded-pass) gpu_tests folded-pass 240 "${workers[@]}" tests/test_kernel_deferred_norm.py tests/test_gpu_parity.py \
                         -k "folded or deferred_norm or (half_precision and default)"
                     for model in llama2_7b llama31_8b; do
                         python3 benchmarks/replay_ab.py --model $model --without '' --prompt 256 --rounds 3 \
                             --setting folded=+decode_fusion,fastllm.passes.decode_fusion.NORM_PROLOGUE=\'rms_scale_deferred\' \
                             --setting folded16=+decode_fusion,fastllm.passes.decode_fusion.NORM_PROLOGUE=\'rms_scale_deferred\',fastllm.kernels.fused_linear.DEFERRED_NORM_BLOCK_N=16 \
                             --out "$OUT" > "$OUT/replay-folded-$model.log" 2>&1 || rc=1
                         tail -n 4 "$OUT/replay-folded-$model.log"
                     done ;;
        fp8pass) python3 benchmarks/bench_quant.py --schemes fp8 --pass-variants fp8_input_quant --out "$OUT" \
                     > "$OUT/quant-fp8pass.log" 2>&1 || rc=1
                 grep -E "tok/s" "$OUT/quant-fp8pass.log" ;;
        *) echo "unknown stage $stage"; rc=1 ;;
    esac
    echo "stage $stage done (rc so far $rc)"
done
exit $rc
