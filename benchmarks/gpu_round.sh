#!/usr/bin/env bash
# One GPU round on the lent machine: `bash benchmarks/gpu_round.sh PART...` (parts below), logs to $OUT.
# Needs ../shared's configs copied to .carry/shared (QUANTA_SHARED) since ../shared does not travel.
set -o pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1 QUANTA_SHARED=${QUANTA_SHARED:-$PWD/.carry/shared}
C=$QUANTA_SHARED/configs
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/gpu.log"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.log"
for part in "$@"; do
  echo "=== $part $(date +%T)" | tee -a "$OUT/gpu.log"
  case $part in
    tests) timeout 240 python -m pytest -q -x tests/gpu tests/test_quantization_kernels.py --timeout 200 2>&1 | tail -25 ;;
    # every GPU test (the interpreter test is left out: the GPU image's triton 3.6 interpreter cannot run it)
    gtests) timeout ${GT_S:-300} python -m pytest -q tests/gpu tests/test_quantization_kernels.py -k "not interpreted" --timeout 200 2>&1 | tail -25 ;;
    # the fused batch-1 GEMVs (their "_nx" default) and the engine on the GPU vs their twins
    gfused) timeout 280 python -m pytest -q tests/gpu/test_gemv_fused_gpu.py tests/gpu/test_engine_gpu.py --timeout 200 2>&1 | tail -8 ;;
    quick) timeout ${QUICK_S:-100} python -m pytest -q tests/gpu/test_engine_gpu.py tests/test_fused_ops_interpret.py tests/test_quantization_kernels.py -k "gpu or engine or overlap or fp8_quant or graph" --timeout 90 2>&1 | tail -15 ;;
    quant) [ -n "$ASM_PICK" ] && [ -f "$OUT/int_gemv_8b.json" ] && export QUANTA_INT_GEMV_ASM_CONFIG=$(python benchmarks/bench_int_gemv.py --best-of "$OUT/int_gemv_8b.json") && echo "asm config: $QUANTA_INT_GEMV_ASM_CONFIG"
      timeout ${QUANT_S:-300} python benchmarks/bench_quant.py --num-requests ${QUANT_REQ:-512} --parts ${QUANT_PARTS:-bf16,awq,fp8,awq_time} ${QUANT_ARGS:-} --json "$OUT/bench_quant.json" 2>&1 | grep -v "Warning\|Calibrating" ;;
    lora) timeout ${LORA_S:-150} python benchmarks/bench_lora.py "$C/llama-3.2-1b.json" --out "$OUT/lora.json" ${LORA_ARGS:-} 2>&1 ;;
    b1) timeout ${B1_S:-150} python -m quanta.cli bench all "$C/llama-3.2-1b.json" --num-requests 1024 ${PEER:-} --json "$OUT/b1.json" 2>&1 | tail -12 ;;
    b8) timeout ${B8_S:-200} python -m quanta.cli bench all "$C/llama-3.1-8b.json" --num-requests 2048 ${PEER:-} --json "$OUT/b8.json" 2>&1 | tail -12 ;;
    b8long) timeout 200 python -m quanta.cli bench throughput "$C/llama-3.1-8b.json" --num-requests 512 --input-len 1000 --output-len 1000 --json "$OUT/b8_1k.json" 2>&1 | tail -6 ;;
    prof1) timeout 120 python benchmarks/profile_step.py "$C/llama-3.2-1b.json" --batch 1 --steps 64 --trace ${PROF_ARGS:-} 2>&1 | tail -40 ;;
    gemv) timeout 150 python benchmarks/bench_gemv.py --json "$OUT/gemv.json" 2>&1 | tail -80 ;;
    # A/B of this session's paths in one run: "0" = fused decode attention + fused GEMVs + LoRA folding off
    lat1ab|lat8ab) cfg=$C/llama-3.2-1b.json; [ $part = lat8ab ] && cfg=$C/llama-3.1-8b.json
      for on in 0 1; do QUANTA_FUSED_DECODE=$on QUANTA_FUSED_GEMV_ROWS=$on timeout 120 python -m quanta.cli bench latency "$cfg" --json "$OUT/${part}_$on.json" 2>&1 | tail -1; done ;;
    loraab) for rows in 0 64; do QUANTA_LORA_FOLD_MAX_ROWS=$rows timeout ${LORA_S:-150} python benchmarks/bench_lora.py "$C/llama-3.2-1b.json" --repeats ${LORA_REPEATS:-5} --out "$OUT/lora_fold$rows.json" 2>&1 | tail -1; done ;;
    pdltest) timeout ${PT_S:-200} python -m pytest -q -x tests/gpu/test_pdl_gpu.py ${PDLTEST_MORE:-tests/gpu/test_gemv_fused_gpu.py tests/gpu/test_decode_attention_fused_gpu.py} --timeout 150 2>&1 | tail -6 ;;
    # PDL (kernels/pdl.py) A/B on 1B batch-1 latency, one run per variant, same machine: env settings per variant
    pdlab) cfg=$C/llama-3.2-1b.json; [ -n "$PDL_8B" ] && cfg=$C/llama-3.1-8b.json
      for v in ${PDL_VARIANTS:-base pdl oproj pdl_oproj pdl_oproj_nopf pdl_oproj_gateup}; do
        env_v="QUANTA_PDL=0"
        case $v in pdl) env_v="QUANTA_PDL=1" ;; oproj) env_v="QUANTA_GEMV_LINEAR_MB=16" ;;
          pdl_oproj) env_v="QUANTA_PDL=1 QUANTA_GEMV_LINEAR_MB=16" ;;
          pdl_oproj_nopf) env_v="QUANTA_PDL=1 QUANTA_PDL_PREFETCH=0 QUANTA_GEMV_LINEAR_MB=16" ;;
          pdl_oproj_gateup) env_v="QUANTA_PDL=1 QUANTA_GEMV_LINEAR_MB=16 QUANTA_FUSED_NORM_MAX_MB=80" ;; esac
        echo "$v: $env_v"; env $env_v timeout 120 python -m quanta.cli bench latency "$cfg" --json "$OUT/pdlab_$v.json" 2>&1 | tail -1
      done ;;
    # lm_head on the skinny GEMV at batch 1 (fast_ops.GEMV_LMHEAD) vs cuBLAS, 1B and 8B, same machine
    lmab) for cfg in llama-3.2-1b llama-3.1-8b; do for on in 0 1; do echo "$cfg QUANTA_GEMV_LMHEAD=$on"
        QUANTA_GEMV_LMHEAD=$on timeout 120 python -m quanta.cli bench latency "$C/$cfg.json" --json "$OUT/lmab_${cfg}_$on.json" 2>&1 | tail -1
      done; done ;;
    # the fused batch-1 GEMVs with the next K step's loads in flight ("_nx") vs the defaults, 1B latency
    nxab) i=0; for v in ${NX_ORDER:-default nx}; do i=$((i+1)); cfgs=""; [ $v = nx ] && cfgs="QUANTA_GEMV_FUSED_CONFIG_NORM=bn4_bk512_sk1_w4_s3_nx QUANTA_GEMV_FUSED_CONFIG_SILU=bn2_bk1024_sk0_w4_s3_nx"
        echo "$v $cfgs"; env $cfgs timeout 120 python -m quanta.cli bench latency "$C/llama-3.2-1b.json" --json "$OUT/nxab_${v}_$i.json" 2>&1 | tail -1
      done ;;
    igemv) timeout 120 python benchmarks/bench_int_gemv.py --models 8b --ms ${IGEMV_MS:-1} ${IGEMV_VARIANTS:+--variants $IGEMV_VARIANTS} --json "$OUT/int_gemv_8b.json" 2>&1 | tail -30 ;;
    # PyTorch's int4 GEMM (w_int_tinygemm.py) and the quantization kernels vs their references
    asmtest) timeout 120 python -m pytest -q tests/test_quantization_kernels.py -k "asm" --timeout 100 2>&1 | tail -8 ;;
    probe) timeout 120 python benchmarks/bench_int_probe.py --json "$OUT/int_probe.json" 2>&1 | tail -8 ;;
    tgtest) timeout 200 python -m pytest -q tests/test_w_int_tinygemm.py tests/test_quantization_kernels.py -k "not interpreted" --timeout 150 2>&1 | tail -8 ;;
    dbench8) timeout 150 python benchmarks/bench_decode_fused.py --model 8b --json "$OUT/decode_fused_8b.json" 2>&1 | tail -8 ;;
    # int GEMVs timed after a reading L2 flush (clean lines, as in decode) instead of a writing one
    igemvr) QUANTA_BENCH_FLUSH=read timeout ${IGEMV_S:-150} python benchmarks/bench_int_gemv.py --models 8b --ms ${IGEMV_MS:-1} ${IGEMV_VARIANTS:+--variants $IGEMV_VARIANTS} ${IGEMV_ARGS:-} --json "$OUT/${IGEMV_JSON:-int_gemv_8b_read}.json" 2>&1 | tail -30 ;;
    # 8B batch 1, bf16 vs W4A16_AWQ: the asm GEMV's default config, then the fastest config per shape (igemvr's JSON)
    lat8shape) J=$OUT/int_gemv_8b_read.json; S=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape); echo "per shape: $S"
      for v in ${LS_ORDER:-bf16 awq awqshape}; do q=""; e="QUANTA_INT_GEMV_ASM=1"; [ $v != bf16 ] && q="--quant-algo W4A16_AWQ"
        [ $v = awqshape ] && e="QUANTA_INT_GEMV_ASM_SHAPES=$S"
        echo "$v"; env "$e" timeout 150 python -m quanta.cli bench latency "$C/llama-3.1-8b.json" $q --json "$OUT/lat8shape_$v.json" 2>&1 | grep -v Calibrating | tail -1; done ;;
    # 8B batch-16 decode: bf16, W4A16_AWQ (default 5-16 row GEMV), AWQ with the fastest config per shape at 16 rows
    # (igemvr's JSON, IGEMV_MS including 16)
    b16shape) J=$OUT/int_gemv_8b_read.json; S=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds _dot --best-m 16); echo "per shape: $S"
      timeout 150 python benchmarks/bench_quant.py --parts bf16 --measures batch16 --json "$OUT/b16_bf16.json" 2>&1 | grep -E "^(bf16|W4A16)"
      timeout 150 python benchmarks/bench_quant.py --parts awq --measures batch16 --json "$OUT/b16_awq.json" 2>&1 | grep -E "^(bf16|W4A16)"
      QUANTA_INT4_GEMV_MANY_SHAPES="$S" timeout 150 python benchmarks/bench_quant.py --parts awq --measures batch16 --json "$OUT/b16_awqshape.json" 2>&1 | grep -E "^(bf16|W4A16)" ;;
    # the RMSNorm writing x_planes for the one-row int4 asm GEMV (QUANTA_INT_GEMV_PLANES): GPU tests, then 8B batch 1
    planestest) timeout 200 python -m pytest -q tests/gpu/test_int_planes_gpu.py --timeout 150 2>&1 | tail -4 ;;
    lat8planes) for v in ${LP_ORDER:-bf16 awq awqplanes}; do q=""; e="QUANTA_INT_GEMV_PLANES=0"; [ $v != bf16 ] && q="--quant-algo W4A16_AWQ"
        [ $v = awqplanes ] && e="QUANTA_INT_GEMV_PLANES=1"
        echo "$v $e"; env $e timeout 150 python -m quanta.cli bench latency "$C/llama-3.1-8b.json" $q --json "$OUT/lat8planes_$v.json" 2>&1 | grep -v Calibrating | tail -1; done ;;
    # 8B batch 1: gate_up's SiLU epilogue (w_int_gemv_asm.SILU_EPILOGUE) on / off
    silu8) i=0; for v in ${S8_ORDER:-bf16 base epi base}; do q="--quant-algo W4A16_AWQ"; e="QUANTA_INT_SILU_EPILOGUE=0"
        case $v in bf16) q="" ;; epi) e="QUANTA_INT_SILU_EPILOGUE=1" ;; esac
        i=$((i+1)); echo "$v $e"; env $e timeout 150 python -m quanta.cli bench latency "$C/llama-3.1-8b.json" $q --json "$OUT/silu8_${i}_$v.json" 2>&1 | grep -v Calibrating | tail -1; done ;;
    planetest) timeout 200 python -m pytest -q tests/gpu/test_int_planes_gpu.py tests/test_quantization_kernels.py -k "not interpreted" --timeout 150 2>&1 | tail -4 ;;
    # batch-1 latency, the tree in .carry/old (a previous commit: git archive) vs this one, same machine: MODEL:QUANT runs
    abold) i=0; for spec in ${AB_RUNS:-1b:bf16 8b:awq}; do IFS=: read -r mdl qa <<< "$spec"; cfg=$C/llama-3.2-1b.json
        [ $mdl = 8b ] && cfg=$C/llama-3.1-8b.json; q=""; [ $qa = awq ] && q="--quant-algo W4A16_AWQ"
        for tree in old new; do i=$((i+1)); src=$PWD/src; [ $tree = old ] && src=$PWD/../old/src; echo "$spec $tree"
          PYTHONPATH=$src:$PWD timeout 150 python -m quanta.cli bench latency "$cfg" $q --json "$OUT/abold_${i}_${mdl}_${qa}_$tree.json" 2>&1 | grep -v Calibrating | tail -1; done; done ;;
    # batch-1 latency under env settings, same machine: ENV_RUNS="MODEL:QUANT:VAR=1,VAR2=0 ..." (MODEL 1b / 8b, QUANT bf16 / awq)
    envab) i=0; for spec in ${ENV_RUNS:-1b:bf16:QUANTA_PDL=0 1b:bf16:QUANTA_PDL=1}; do IFS=: read -r mdl qa ev <<< "$spec"
        cfg=$C/llama-3.2-1b.json; [ $mdl = 8b ] && cfg=$C/llama-3.1-8b.json; q=""; [ $qa = awq ] && q="--quant-algo W4A16_AWQ"
        i=$((i+1)); echo "$spec"
        if [[ $qa == *x* ]]; then  # "awqx16" / "bf16x4": decode tok/s of 16 / 4 sequences (bench_quant.py)
          p=${qa%x*}
          env ${ev//,/ } timeout 200 python benchmarks/bench_quant.py --config "$cfg" --parts $p --measures batch${qa#*x} --calib-batches 8 --json "$OUT/envab_${i}_${mdl}_${qa}.json" 2>&1 | grep -E "^(bf16|W4A16)" | tail -1
        else env ${ev//,/ } timeout 150 python -m quanta.cli bench latency "$cfg" $q --json "$OUT/envab_${i}_${mdl}_${qa}.json" 2>&1 | grep -v Calibrating | tail -1; fi; done ;;
    # 1B throughput (TP_REQ requests, 128 / 128), the tree in .carry/old vs this one, same machine
    tpold) for tree in old new; do src=$PWD/src; [ $tree = old ] && src=$PWD/../old/src; echo "1b throughput $tree"
        PYTHONPATH=$src:$PWD timeout 150 python -m quanta.cli bench throughput "$C/llama-3.2-1b.json" --num-requests ${TP_REQ:-1024} --json "$OUT/tpold_$tree.json" 2>&1 | tail -2; done ;;
    # the split norm (QUANTA_SPLIT_NORM) vs its twins
    normtest) timeout ${NT_S:-250} python -m pytest -q tests/gpu/test_split_norm_gpu.py --timeout 150 2>&1 | tail -8 ;;
    dtest) timeout 250 python -m pytest -q tests/gpu/test_decode_attention_fused_gpu.py ${DTEST_MORE:-tests/gpu/test_int_planes_gpu.py} --timeout 150 2>&1 | tail -4 ;;
    b16awq) timeout 150 python benchmarks/bench_quant.py --parts awq --measures batch16 --json "$OUT/b16_awq_default.json" 2>&1 | grep -E "^(bf16|W4A16)" ;;
    qktest) timeout 200 python -m pytest -q tests/test_quantization_kernels.py tests/gpu/test_engine_gpu.py -k "not interpreted" --timeout 150 2>&1 | tail -4 ;;
    # 1B W4A16_AWQ batch 1: bf16, the asm GEMV's defaults, the fifth session's (auto split-K everywhere, no x planes)
    lat1q) for v in ${L1_ORDER:-bf16 awq awqold}; do q=""; e="QUANTA_INT_GEMV_ASM=1"; [ $v != bf16 ] && q="--quant-algo W4A16_AWQ"
        [ $v = awqold ] && e="QUANTA_INT_GEMV_ASM_CONFIG=bn8_bk1024_sk0_w4_s1 QUANTA_INT_GEMV_ASM_CONFIG_LONG=bn8_bk1024_sk0_w4_s1 QUANTA_INT_GEMV_PLANES=0"
        echo "$v $e"; env $e timeout 100 python -m quanta.cli bench latency "$C/llama-3.2-1b.json" $q --json "$OUT/lat1q_$v.json" 2>&1 | grep -v Calibrating | tail -1; done ;;
    proberead) QUANTA_BENCH_FLUSH=read timeout 120 python benchmarks/bench_int_probe.py --json "$OUT/int_probe_read.json" 2>&1 | tail -12 ;;
    # 8B batch 1, bf16 vs W4A16_AWQ (asm GEMV): its default config, then (with igemvr's JSON) the fastest asm config
    lat8awq) for v in bf16 awq awqbest; do q=""; e="QUANTA_INT_GEMV_ASM=1"; [ $v != bf16 ] && q="--quant-algo W4A16_AWQ"
        if [ $v = awqbest ]; then [ -f "$OUT/int_gemv_8b_read.json" ] || continue
          e="QUANTA_INT_GEMV_ASM_CONFIG=$(python benchmarks/bench_int_gemv.py --best-of "$OUT/int_gemv_8b_read.json")"; fi
        echo "$v $e"; env $e timeout 150 python -m quanta.cli bench latency "$C/llama-3.1-8b.json" $q --json "$OUT/lat8awq_$v.json" 2>&1 | grep -v Calibrating | tail -1; done ;;
    dbench) timeout 150 python benchmarks/bench_decode_fused.py --model 1b --json "$OUT/decode_fused_1b.json" 2>&1 | tail -8 ;;
    fbench) timeout 150 python benchmarks/bench_fused_gemv.py --model 1b --json "$OUT/fused_gemv.json" 2>&1 | tail -30 ;;
    # W4A16_AWQ 8B batch 1: per-kernel eager trace (where the step goes)
    awqprof) PROF_ROWS=25 timeout 200 python benchmarks/profile_step.py "$C/llama-3.1-8b.json" --batch 1 --steps 16 --trace --eager --quant-algo W4A16_AWQ 2>&1 | tail -40 ;;
    # 8B batch-1 latency: bf16, W4A16 on the asm GEMV (config picked from igemv's JSON when there), W4A16 on bytes
    lat8q) [ -f "$OUT/int_gemv_8b.json" ] && export QUANTA_INT_GEMV_ASM_CONFIG=$(python benchmarks/bench_int_gemv.py --best-of "$OUT/int_gemv_8b.json")
      echo "asm config: ${QUANTA_INT_GEMV_ASM_CONFIG:-default}"
      for v in bf16 w4asm w4bytes; do q=""; e="QUANTA_INT_GEMV_ASM=1"; [ $v != bf16 ] && q="--quant-algo W4A16"; [ $v = w4bytes ] && e="QUANTA_INT_GEMV_ASM=0"
        echo "$v"; env $e timeout 150 python -m quanta.cli bench latency "$C/llama-3.1-8b.json" $q --json "$OUT/lat8q_$v.json" 2>&1 | tail -1; done ;;
    # the tensor-core int4 GEMV (quantization/w_int_mma.py): the linears of an 8B step in isolation, what w_int_linear
    # picked before vs the mma defaults and the SiLU epilogue; then the engine at batch 1 / 4 / 16, mma off vs on
    mmabench) QUANTA_BENCH_FLUSH=read timeout 120 python benchmarks/bench_int_gemv.py --models 8b --ms ${MMA_MS:-1,2,4,8,16} --zero-point --variants auto:x,mma:auto,silu:t2_w2,silu:t2_w2_np --json "$OUT/mma_gemv.json" 2>&1 | grep -E "^8b|auto|silu" | tail -40 ;;
    mmab) timeout 80 python benchmarks/bench_quant.py --parts bf16 --measures batch1,batch4,batch16 --json "$OUT/mmab_bf16.json" 2>&1 | grep -E "^bf16"
      for rows in "" 2-16; do echo "QUANTA_INT_MMA_ROWS='$rows'"; QUANTA_INT_MMA_ROWS=$rows QUANTA_INT_MMA_SILU_ROWS=${rows:+1-8} timeout 120 python benchmarks/bench_quant.py --parts awq --measures batch1,batch4,batch16 --calib-batches 8 --json "$OUT/mmab_awq_${rows:-off}.json" 2>&1 | grep -E "^W4A16"; done ;;
    # the mma GEMV's GPU tests; its kernel configs (MMA_VARIANTS at MMA_MS rows) in this tree against the defaults of
    # the tree in ../old; the engine (W4A16_AWQ, CP_MEASURES, CP_TREES="old new[:VAR=1,...]"), ../old vs this tree
    mmatest) timeout ${MT_S:-240} python -m pytest -q -x tests/gpu/test_w_int_mma_gpu.py -k "${MT_K:-not engine}" --timeout 200 2>&1 | tail -6 ;;
    cpbench) for tree in old new; do src=$PWD/src; v=${MMA_VARIANTS:-auto:x,mma:auto}; [ $tree = old ] && src=$PWD/../old/src && v=auto:x,mma:auto,silu:t2_w2
        echo "kernels, $tree tree"; PYTHONPATH=$src:$PWD QUANTA_BENCH_FLUSH=read timeout ${CP_S:-200} python benchmarks/bench_int_gemv.py --models 8b --ms ${MMA_MS:-1,16} --zero-point --variants $v --json "$OUT/cp_gemv_$tree.json" 2>&1 | grep -E "^8b|auto|silu|mma" | tail -60; done ;;
    cpab) [ -n "$CP_BF16" ] && timeout 80 python benchmarks/bench_quant.py --parts bf16 --measures batch1,batch4,batch16 --json "$OUT/cpab_bf16.json" 2>&1 | grep -E "^bf16"
      i=0; for spec in ${CP_TREES:-old new}; do IFS=: read -r tree ev <<< "$spec"; src=$PWD/src; [ $tree = old ] && src=$PWD/../old/src
        i=$((i+1)); echo "awq, $tree tree ${ev}"; env ${ev//,/ } PYTHONPATH=$src:$PWD timeout 150 python benchmarks/bench_quant.py --parts awq --measures ${CP_MEASURES:-batch1,batch4,batch16} --calib-batches 8 --json "$OUT/cpab_awq_${i}_$tree.json" 2>&1 | grep -E "^W4A16"; done ;;
    # the mma GEMV's configs at PX_MS rows (PX_VARIANTS, explicit configs), then the engine (batch 16, bf16 in the same
    # run) with its defaults vs the fastest config of each shape (QUANTA_INT_MMA_SHAPES), the default again last
    pxab) J=$OUT/px_gemv.json; QUANTA_BENCH_FLUSH=read timeout ${PX_S:-200} python benchmarks/bench_int_gemv.py --models 8b --ms ${PX_MS:-16} --zero-point --variants ${PX_VARIANTS:-mma:t1_w8,mma:t1_w8_px,mma:t2_w2_np,mma:t2_w2_np_px} --json $J 2>&1 | grep -E "^8b|mma" | tail -40
      S=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds mma: --best-m ${PX_M:-16}); echo "per shape: $S"
      timeout 80 python benchmarks/bench_quant.py --parts bf16 --measures ${PX_MEASURES:-batch16} --json "$OUT/pxab_bf16.json" 2>&1 | grep -E "^bf16"
      i=0; for v in default shapes default; do i=$((i+1)); e=""; [ $v = shapes ] && e="$S"; echo "awq $v '$e'"
        QUANTA_INT_MMA_SHAPES="$e" timeout 150 python benchmarks/bench_quant.py --parts awq --measures ${PX_MEASURES:-batch16} --calib-batches 8 --json "$OUT/pxab_awq_${i}_$v.json" 2>&1 | grep -E "^W4A16"; done ;;
    # kernel time lines (busy, gaps, PDL overlap, per-kernel durations) of decode steps in graph mode:
    # TL_RUNS="MODEL:QUANT:BATCH[:VAR=1,VAR2=0] ..." (QUANTA_PDL=0: each kernel's duration is its own)
    timeline) for spec in ${TL_RUNS:-8b:awq:1 1b:bf16:1}; do IFS=: read -r mdl qa bs ev <<< "$spec"; cfg=$C/llama-3.2-1b.json
        [ $mdl = 8b ] && cfg=$C/llama-3.1-8b.json; q=""; [ $qa = awq ] && q="--quant-algo W4A16_AWQ"; echo "timeline $spec"
        env ${ev//,/ } PROF_ROWS=3 timeout 150 python benchmarks/profile_step.py "$cfg" --batch $bs --steps 32 --trace --timeline $q 2>&1 | grep -vE "^-|Calibrating|^ *Name|^Self" | tail -34; done ;;
    # what the engine's step adds to its graph's replay (upload, feed, download, the host a step behind)
    bubble) for spec in ${BB_RUNS:-1b:bf16:1 1b:bf16:1:QUANTA_PDL=0}; do IFS=: read -r mdl qa bs ev <<< "$spec"; cfg=$C/llama-3.2-1b.json
        [ $mdl = 8b ] && cfg=$C/llama-3.1-8b.json; q=""; [ $qa = awq ] && q="--quant-algo W4A16_AWQ"; echo "bubble $spec"
        env ${ev//,/ } timeout 150 python benchmarks/profile_step.py "$cfg" --batch $bs --steps ${BB_STEPS:-128} --bubble $q 2>&1 | grep -vE "Calibrating|^ +[a-z]+ +[0-9.]+ ms$" | tail -16; done ;;
    # Nsight Compute on the int4 GEMVs (benchmarks/ncu_int_gemv.py): occupancy, warp stall reasons, DRAM throughput
    ncu) timeout ${NCU_S:-300} ncu --clock-control none --kernel-name regex:"_w4_mma|_w_int_gemv_asm" --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis \
        python benchmarks/ncu_int_gemv.py ${NCU_ARGS:-} > "$OUT/ncu.txt" 2>&1; tail -5 "$OUT/ncu.txt" ;;
    # the seventeenth session's off-by-default builds vs their twins: mma "_p2" / "_l2" / 16 warps, asm L2 prefetch
    l2test) timeout 150 python -m pytest -q tests/gpu/test_w_int_mma_gpu.py -k "p2 or w16 or l2 or r128 or r96" --timeout 120 2>&1 | tail -2
      timeout 100 python -m pytest -q tests/gpu/test_pdl_gpu.py -k "asm or w4" --timeout 90 2>&1 | tail -2 ;;
    # one row's gate_up + SiLU on the mma GEMV with a register cap (ptxas then issues the next group's loads before
    # this group's math: offline SASS), the asm GEMV's L2 prefetch, qkv / o / down on the mma GEMV (capped) instead
    # of the asm one: isolated, then 8B AWQ batch 1 vs the defaults
    silu1r) IGEMV_MS=1 IGEMV_VARIANTS=silu:t2_w2,silu:t2_w2_r128,silu:t2_w2_ps_r128,silu:t2_w2_r112 bash "$0" igemvr | grep "^8b gate_up"
      ENV_RUNS="8b:awq 8b:awq:QUANTA_INT_MMA_SILU_CONFIG=t2_w2_r128 8b:awq:QUANTA_INT_MMA_SILU_CONFIG=t2_w2_ps_r128
        8b:awq:QUANTA_INT_L2_PREFETCH=1 8b:awq:QUANTA_INT_MMA_ROWS=1-16,QUANTA_INT_GEMV_PLANES=0,QUANTA_INT_MMA_SHAPES=${R1:-6144x4096=t1_w4_px_ps_r96;4096x4096=t1_w4_px_ps_r96;4096x14336=t1_w4_px_ps_r96}
        8b:awq" bash "$0" envab ;;
    # 9-16-row mma GEMV configs: the sweep at 16 rows (reading flush), then batch 16 with each shape's fastest vs defaults
    mma16) IGEMV_MS=16 IGEMV_VARIANTS=${MMA16_VARIANTS:-mma:auto,mma:t1_w4_px_ps_r128,mma:t1_w4_px_ps_r144,mma:t1_w8_px_ps_r128,mma:t1_w8_px_ps_r120,mma:t1_w8_px_ps_p2,mma:t1_w8_ps_p2,mma:t1_w4_px_ps_p2,mma:t2_w16_px_ps,mma:t2_w16_ps,mma:t2_w8_px_ps,mma:t2_w2_ps_p2,mma:t2_w2_np_ps,mma:t1_w16_px_ps,mma:t2_w4_np_ps} \
        bash "$0" igemvr | grep "^8b [a-z]"
      B=$(python benchmarks/bench_int_gemv.py --best-of "$OUT/int_gemv_8b_read.json" --per-shape --best-kinds mma: --best-m 16); echo "fastest: $B"
      ENV_RUNS="8b:awqx16 8b:awqx16:QUANTA_INT_MMA_SHAPES=$B 8b:awqx16 8b:awqx16:QUANTA_INT_MMA_SHAPES=$B" bash "$0" envab ;;
    # one-row asm GEMV on x planes (8B qkv) under a register cap (offline SASS: 40 registers interleave loads and
    # math; capped, all of a K step's loads first): isolated, then 8B AWQ batch 1 vs the default
    planes96) P=bn4_bk1024_sk1_w4_s1; IGEMV_MS=1 IGEMV_VARIANTS=asm:${P}_xp,asm:${P}_r96_xp,asm:bn4_bk2048_sk1_w4_s1_r96_xp,asm:bn8_bk1024_sk1_w4_s1_r96_xp,asm:${P}_nx_r96_xp \
        bash "$0" igemvr | grep "^8b qkv"
      ENV_RUNS="8b:awq 8b:awq:QUANTA_INT_GEMV_PLANES_CONFIG=${P}_r96_xp 8b:awq:QUANTA_INT_GEMV_PLANES_CONFIG=${P96_OTHER:-bn4_bk2048_sk1_w4_s1_r96_xp}
        8b:awq 8b:awq:QUANTA_INT_GEMV_PLANES_CONFIG=${P}_r96_xp" bash "$0" envab ;;
    # the int GEMVs timed as a chain of CHAIN distinct weight copies in one graph (each launch's PDL preload overlapping
    # the one before, as in decode; zero points): IGEMV_MS / IGEMV_VARIANTS as igemvr
    igemvc) IGEMV_ARGS="--chain ${CHAIN:-8} --zero-point ${IGEMV_ARGS:-}" bash "$0" igemvr ;;
    # the twenty-first session: the chain bench (8 weight copies a graph under PDL, as decode runs them) at 16 and 1
    # rows (calls s21a-c), then the new defaults' GPU tests and the engine against the old defaults by env, same call
    chaintest) timeout ${CT_S:-200} python -m pytest -q tests/gpu/test_w_int_mma_gpu.py -k "ps_r96 or ps_p2_r128 or w4_ps_r128 or np_ps or x_frag" --timeout 150 2>&1 | tail -2 ;;
    chainplan) IGEMV_S=${CP_S:-240} IGEMV_JSON=chain16 IGEMV_MS=16 IGEMV_VARIANTS=${CP16:-mma:auto,mma:t2_w2_px_ps,mma:t2_w2_ps,silu:t2_w2,silu:t2_w2_ps,silu:t2_w2_np_ps,mma:t1_w8_px_ps_p2,mma:t1_w4_px_ps_p2,mma:t2_w8_px_ps,mma:t2_w8_ps,mma:t4_w8_ps,mma:t2_w16_px_ps,mmaxf:auto,mmaxf:t2_w8_px_ps,mmaxf:t4_w8_ps,siluxf:t2_w2_np_ps_r128} bash "$0" igemvc | grep "^8b [a-z]"
      IGEMV_S=${CP_S:-240} IGEMV_JSON=chain1 IGEMV_MS=1 IGEMV_VARIANTS=${CP1:-auto:x,mma:auto,mma:t1_w8_ps_r96,mma:t1_w4_ps_r96,mma:t1_w8_r96,silu:t2_w2_ps_r128,silu:t2_w2_r128,silu:t2_w2_ps_p2_r128,silu:t2_w4_ps_r128,mma:t1_w8_ps_p2_r96,mma:t1_w16_ps_r96,mma:t1_w8_ps_l2_r96,mmaxf:t1_w8_ps_r96} bash "$0" igemvc | grep "^8b [a-z]" ;;
    defaults21) timeout ${D21_S:-150} python -m pytest -q tests/gpu/test_w_int_mma_gpu.py tests/gpu/test_int_planes_gpu.py tests/gpu/test_split_norm_gpu.py -k "t2_w8_px_ps or t1_w8_ps_r96 or t2_w16_px_ps or ps_p2_r128 or t2_w2_np_ps or engine" --timeout 120 2>&1 | tail -2
      OLD16=QUANTA_INT_MMA_SILU_ROWS=1-8,QUANTA_INT_MMA_SHAPES="6144x4096=t1_w4_px_ps;4096x14336=t1_w8_px_ps"
      OLD1=QUANTA_INT_MMA_ROWS=2-16,QUANTA_INT_MMA_SILU_CONFIG=t2_w2_ps_r128  # before: one row on the asm GEMV
      ENV_RUNS="8b:awqx16 8b:awqx16:$OLD16 8b:bf16x16 8b:awq 8b:awq:$OLD1 8b:bf16 ${D21_MORE:-}" bash "$0" envab ;;
    # the next lead (not yet run): one row's K loops take ~1 us an iteration whatever their bytes (down: 14 groups a
    # warp in 14.3 us, gate_up + SiLU: 16 groups of two tiles in 18.3): each waits on the x it loads in that iteration
    # (one row: not prefetched) and on words only one group ahead, so "_p2" alone (words) did not help; x and words
    # both ahead ("_px" + "_p2", offline SASS t1_w8_px_ps_p2_r96: 96 registers, all 7 loads before the 8 HMMA), and the
    # SiLU kernel's shape (two tiles a warp) on the plain GEMV; chain bench at one row, then the engine on the fastest
    one22) timeout 150 python -m pytest -q tests/gpu/test_w_int_mma_gpu.py -k "ps_p2_r128 or px_ps_p2" --timeout 120 2>&1 | tail -2
      J=$OUT/chain1d.json; IGEMV_S=${O22_S:-150} IGEMV_JSON=chain1d IGEMV_MS=1 IGEMV_VARIANTS=${O22_VARIANTS:-mma:t1_w8_ps_r96,mma:t1_w8_px_ps_r96,mma:t1_w8_px_ps_p2_r96,mma:t1_w8_px_ps_p2_r80,mma:t1_w4_px_ps_p2_r96,mma:t1_w16_px_ps_p2_r64,mma:t1_w16_px_ps_r64,mma:t2_w16_px_ps_p2_r128,mma:t2_w8_px_ps_p2_r128,silu:t2_w2_ps_p2_r128,silu:t2_w2_px_ps_p2_r128,silu:t2_w2_px_ps_r128,silu:t2_w4_px_ps_p2_r128} bash "$0" igemvc | grep "^8b [a-z]"
      S=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds mma: --best-m 1)
      SC=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds silu: --best-m 1 | cut -d= -f2); echo "per shape: $S; SiLU: $SC"
      B=QUANTA_INT_MMA_SHAPES=$S,QUANTA_INT_MMA_SILU_CONFIG=$SC
      ENV_RUNS="8b:awq 8b:awq:QUANTA_INT_MMA_SHAPES=$S 8b:awq:$B 8b:awq 8b:awq:$B 8b:bf16" bash "$0" envab ;;
    # twenty-second session: one row with every warp resident at once (registers x warps), the chain sweep, then the
    # engine at batch 1 on each shape's fastest vs the defaults, with bf16
    one23) timeout 200 python -m pytest -q tests/gpu/test_w_int_mma_gpu.py tests/gpu/test_int_planes_gpu.py tests/gpu/test_split_norm_gpu.py \
        -k "px_ps_r96 or w16_px_ps_r64 or px_ps_r72 or w16_ps_r64 or w32 or r56 or t2_w8_ps_r96 or px_ps_r80 or ps_p2_r96 or ps_p2_r64 or engine" --timeout 150 2>&1 | tail -2
      J=$OUT/chain1e.json; IGEMV_S=${O23_S:-150} IGEMV_JSON=chain1e IGEMV_MS=1 IGEMV_VARIANTS=${O23_VARIANTS:-mma:t1_w8_ps_r96,mma:t1_w8_px_ps_r96,mma:t1_w16_px_ps_r64,mma:t1_w8_px_ps_r72,mma:t1_w8_px_ps_r80,mma:t1_w16_ps_r64,mma:t1_w32_px_ps_r64,mma:t1_w16_px_ps_r56,mma:t2_w8_ps_r96,mma:t1_w16_ps_p2_r64,silu:t2_w2_ps_p2_r128,silu:t2_w4_px_ps_r80,silu:t2_w2_ps_p2_r96,silu:t2_w4_px_ps_r72} bash "$0" igemvc | grep "^8b [a-z]"
      S=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds mma: --best-m 1)
      SC=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds silu: --best-m 1 | cut -d= -f2); echo "per shape: $S; SiLU: $SC"
      B=QUANTA_INT_MMA_SHAPES=$S,QUANTA_INT_MMA_SILU_CONFIG=$SC
      ENV_RUNS="8b:awq 8b:awq:$B 8b:awq 8b:awq:$B 8b:bf16" bash "$0" envab ;;
    # the twenty-second session's one-row defaults: their GPU tests and the engine tests, then 8B AWQ batch 1 on them
    # and on the twenty-first session's (by env) twice, bf16, batch 16 and its bf16, and the batch-1 time line
    defaults22) timeout ${D22_S:-220} python -m pytest -q tests/gpu/test_w_int_mma_gpu.py tests/gpu/test_int_planes_gpu.py tests/gpu/test_split_norm_gpu.py tests/gpu/test_engine_gpu.py \
        -k "px_ps_r80 or w16_ps_r64 or px_ps_r72 or engine or awq or planes" --timeout 150 2>&1 | tail -2
      O="QUANTA_INT_MMA_SHAPES=6144x4096=t1_w8_ps_r96;4096x4096=t1_w8_ps_r96;4096x14336=t1_w8_ps_r96,QUANTA_INT_MMA_SILU_CONFIG=t2_w2_ps_p2_r128"
      ENV_RUNS="8b:awq 8b:awq:$O 8b:awq 8b:awq:$O 8b:bf16 8b:awqx16 8b:bf16x16" bash "$0" envab
      TL_RUNS="8b:awq:1:QUANTA_PDL=0" timeout 100 bash "$0" timeline ;;
    # 16 rows with register caps (the one-row lesson: every warp resident), chain sweep, then batch 16 on the fastest
    rows16r) J=$OUT/chain16r.json; IGEMV_S=${R16_S:-120} IGEMV_JSON=chain16r IGEMV_MS=16 IGEMV_VARIANTS=${R16_VARIANTS:-mma:auto,mma:t1_w16_px_ps_r64,mma:t1_w16_ps_r64,mma:t1_w8_px_ps_r96,mma:t1_w8_px_ps_r128,mma:t2_w8_ps_r96,mma:t2_w16_px_ps_p2_r128,mma:t1_w4_px_ps_r96,silu:t2_w2_np_ps,silu:t2_w4_px_ps_r72,silu:t2_w4_px_ps_r80,silu:t2_w2_ps_p2_r96} bash "$0" igemvc | grep "^8b [a-z]"
      S=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds mma: --best-m 16)
      SC=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds silu: --best-m 16 | cut -d= -f2); echo "per shape: $S; SiLU: $SC"
      ENV_RUNS="8b:awqx16 8b:awqx16:QUANTA_INT_MMA_SHAPES=$S,QUANTA_INT_MMA_SILU_CONFIG=$SC 8b:bf16x16" bash "$0" envab ;;
    # the int GEMVs isolated (reading flush) in each tree of TREES (.carry/<tree>: a commit's git archive; clean = this
    # one), each with its own bench script
    igemvtrees) for tree in ${TREES:-old clean}; do echo "tree $tree"; (cd "$PWD/../$tree" && PYTHONPATH=$PWD/src:$PWD \
        QUANTA_BENCH_FLUSH=read timeout ${IGEMV_S:-150} python benchmarks/bench_int_gemv.py --models 8b --ms ${IGEMV_MS:-1} \
        ${IGEMV_VARIANTS:+--variants $IGEMV_VARIANTS} --json "$OUT/int_gemv_8b_$tree.json" 2>&1 | grep "^8b [a-z]"); done ;;
    # the twentieth session's mma layout (whole-sector loads of words and x, packed scales): GPU tests, then 8B AWQ
    # batch 16 / 1 and the isolated GEMVs in the trees before (old), with the words only (mid) and now (clean)
    layout) timeout ${LT_S:-200} python -m pytest -q tests/gpu/test_w_int_mma_gpu.py tests/gpu/test_split_norm_gpu.py --timeout 150 2>&1 | tail -3
      T=$PWD/..; ENV_RUNS="8b:awqx16:PYTHONPATH=$T/old/src:$PWD 8b:awqx16" bash "$0" envab
      IGEMV_MS=1,16 IGEMV_VARIANTS=${LT_VARIANTS:-mma:auto,silu:t2_w2_r128} TREES="old mid clean" bash "$0" igemvtrees
      ENV_RUNS="8b:awqx16:PYTHONPATH=$T/mid/src:$PWD 8b:awq:PYTHONPATH=$T/old/src:$PWD 8b:awq ${LT_MORE:-}" bash "$0" envab ;;
    # one row's gate_up + SiLU configs on this tree's layout (isolated, zero points), then 8B AWQ batch 1 with the
    # fastest by env vs the default, the old tree and bf16; batch 16 and its bf16
    silu1b) J=$OUT/int_gemv_8b_read.json; IGEMV_MS=1 IGEMV_ARGS=--zero-point IGEMV_VARIANTS=${S1_VARIANTS:-silu:t2_w2_r128,silu:t2_w2_ps_r128,silu:t2_w2_ps,silu:t2_w2,silu:t2_w2_r112,silu:t2_w4_r128,silu:t2_w4_ps} bash "$0" igemvr | grep "^8b gate_up"
      B=$(python benchmarks/bench_int_gemv.py --best-of $J --best-kinds silu: --best-m 1); echo "fastest: $B"; T=$PWD/..
      ENV_RUNS="8b:awq 8b:awq:QUANTA_INT_MMA_SILU_CONFIG=$B 8b:awq:PYTHONPATH=$T/old/src:$PWD 8b:bf16 ${S1_MORE:-8b:awqx16 8b:bf16x16}" bash "$0" envab ;;
    # 16-row mma configs on this tree's layout (isolated, zero points), then 8B AWQ batch 16 with each shape's fastest
    # by env vs the defaults (twice), and batch 1 on the defaults
    mma16b) J=$OUT/int_gemv_8b_read.json; IGEMV_MS=16 IGEMV_ARGS=--zero-point IGEMV_VARIANTS=${M16_VARIANTS:-mma:auto,mma:t2_w2_ps,mma:t2_w4_np_ps,mma:t1_w4_px_ps,mma:t1_w8_px_ps,mma:t2_w4_ps,mma:t2_w2_px_ps,mma:t1_w4_ps} bash "$0" igemvr | grep "^8b [a-z]"
      S=$(python benchmarks/bench_int_gemv.py --best-of $J --per-shape --best-kinds mma: --best-m 16); echo "fastest: $S"
      ENV_RUNS="8b:awqx16 8b:awqx16:QUANTA_INT_MMA_SHAPES=$S 8b:awqx16 8b:awqx16:QUANTA_INT_MMA_SHAPES=$S 8b:awq" bash "$0" envab ;;
    # the same, second round: the GPU tests of the default configs, 8B AWQ batch 16 / 1 old vs this tree, isolated
    layout2) timeout ${LT_S:-200} python -m pytest -q tests/gpu/test_w_int_mma_gpu.py tests/gpu/test_split_norm_gpu.py --timeout 150 \
        -k "${LT_K:-t1_w8_px_ps or t2_w2_np_ps or t1_w4_px_ps or silu or bias or engine or consumer}" 2>&1 | tail -3
      T=$PWD/..; ENV_RUNS="8b:awqx16:PYTHONPATH=$T/old/src:$PWD 8b:awqx16 8b:awq:PYTHONPATH=$T/old/src:$PWD 8b:awq" bash "$0" envab
      IGEMV_MS=1,16 IGEMV_VARIANTS=${LT_VARIANTS:-mma:auto,silu:t2_w2_r128} TREES="old clean" bash "$0" igemvtrees ;;
    lat1) timeout 120 python -m quanta.cli bench latency "$C/llama-3.2-1b.json" --json "$OUT/lat1.json" 2>&1 | tail -1 ;;
    *) echo "unknown part $part" ;;
  esac 2>&1 | tee -a "$OUT/gpu.log"
done
