#!/usr/bin/env bash
# pack.sh OUTDIR: build the parts that carry vLLM 0.26.0 (and Unsloth 2026.10.7 + TRL 1.15.0) to the GPU
# machine. Runs HERE (it needs PyPI), never there.
#
# Why parts: the GPU machine (one H200; Python 3.12, torch 2.11.0+cu130, transformers 5.17) reaches no
# network, and one device `run` call carries at most 64 MiB (the repo's tree plus the paths named in
# `carry`). vLLM 0.26.0 (the newest vLLM whose wheel pins torch==2.11.0) is a 304 MB wheel with ~110
# dependencies the machine lacks. So: install the wheels here into target folders (--no-deps, cp312
# manylinux x86_64), drop what an 8B dense Qwen3-VL in bf16 never loads on a Hopper GPU (see TRIM below:
# each drop was checked in vLLM 0.26.0's code), zero the non-sm_90 kernels in vLLM's _C library
# (fatbin_prune.py), pack each folder with xz -9e, cut into pieces of at most 58 MiB and group them into
# part folders OUTDIR/p1, p2, ... (each at most 58 MiB). Files written under /tmp there survive from one
# call to the next while the machine stays warm (it goes back ~30 s after a call returns), so the parts go
# in back-to-back calls, each copying its part to /tmp/carry; the last call runs install.sh, which joins
# and unpacks them into /tmp/site (PYTHONPATH=/tmp/site).
#
#   bash bench/carry/pack.sh /tmp/carry-parts       # ~15 min on 2 cores, mostly xz
# Env: VLLM_WHEEL (default /work/wheels/vllm-0.26.0-...whl, else downloaded), CARRY_WORK (build folder,
# default /tmp/cua-carry-work), XZ_THREADS (default 2), PART_MIB (default 58); SKIP_BUILD=1 reuses the
# trimmed folders already in CARRY_WORK, and PACK="deps unsloth" re-packs only those archives.
set -euo pipefail
OUT=${1:?usage: bash bench/carry/pack.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${CARRY_WORK:-/tmp/cua-carry-work}
VLLM_WHEEL=${VLLM_WHEEL:-/work/wheels/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl}
XZ_THREADS=${XZ_THREADS:-2}
PART_MIB=${PART_MIB:-58}
PY=${PYTHON:-python3}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_26_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64)

# vLLM 0.26.0's Requires-Dist, resolved recursively for cp312 linux x86_64 (pip install --dry-run --report
# with stub wheels standing in for torch/torchvision/torchaudio), minus what the GPU machine already has
# (torch, torchvision, torchaudio, transformers, numpy, tokenizers, triton, numba, grpcio, aiohttp, ...)
# and minus the kernel packages in DROPPED_DEPS below. xgrammar/apache-tvm-ffi: vLLM pins tvm-ffi 0.1.10
# for flashinfer/tilelang (both dropped; vLLM itself never imports tvm_ffi); the kit needs xgrammar>=0.2.8,
# which needs tvm-ffi>=0.1.11, so the kit's pair is carried instead. typing-extensions is on the machine,
# but pydantic 2.14 needs >=4.14.1 and the machine's version is not recorded: the carried one shadows it.
VLLM_DEPS=(
  agent-detector==2.0.0 annotated-types==0.8.0 anthropic==2.16.0 apache-tvm-ffi==0.1.15.post2 astor==0.8.1
  blake3==1.0.11 cachetools==8.0.2 cbor2==6.3.0 cffi==2.1.1 compressed-tensors==0.17.0 cryptography==50.0.2
  depyf==0.20.0 detect-installer==0.2.1 dill==0.4.1 dnspython==2.9.2 docstring-parser==0.18.0
  email-validator==2.4.0 fastapi==0.136.3 fastapi-cli==0.0.34 fastapi-cloud-cli==0.28.0 fastar==0.12.0
  googleapis-common-protos==1.76.0 httpcore2==2.16.2 httptools==0.9.0 httpx2==2.16.2 ijson==3.6.0
  interegular==0.3.3 jiter==0.19.0 jmespath==1.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  lark==1.2.2 llguidance==1.7.6 lm-format-enforcer==0.11.3 loguru==0.7.3 mcp==2.3.0 mcp-types==2.3.0
  mistral-common==1.13.1 model-hosting-container-standards==0.1.16 msgspec==0.23.0 nvtx==0.2.15
  openai==3.57.0 openai-harmony==0.0.8 opentelemetry-api==1.45.2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp==1.45.2 opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-proto-grpc==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-semantic-conventions-ai==0.5.1
  outlines-core==0.2.14 partial-json-parser==0.2.1.1.post7 prometheus-fastapi-instrumentator==8.1.0
  pybase64==1.5.1 pycountry==26.2.16 pycparser==3.12 pydantic==2.14.4 pydantic-core==2.50.5
  pydantic-extra-types==2.11.1 pydantic-settings==2.16.3 pyjwt==2.15.1 python-dotenv==1.2.4
  python-json-logger==4.2.0 python-multipart==0.0.34 pyzmq==27.3.0 referencing==0.37.0 rich-toolkit==0.20.6
  rignore==0.8.1 rpds-py==2026.9.1 sentry-sdk==2.75.0 setproctitle==1.3.8 sniffio==1.3.1 sse-starlette==3.7.1
  starlette==1.10.0 supervisor==4.3.0 truststore==0.10.5 typing-inspection==0.4.5 uvicorn==0.55.0
  watchfiles==1.3.0 websockets==17.4 xgrammar==0.2.9 typing-extensions==4.16.0
)
# Resolved the same way but NOT carried (what they are for, and why an 8B dense bf16 Qwen3-VL on sm_90
# never loads them: every import of them in vLLM 0.26.0 is lazy or guarded by find_spec/try):
#   flashinfer-python, nvidia-cudnn-frontend, cuda-tile, torch-c-dlpack-ext: FlashInfer attention/sampling/
#     MoE; on sm_90 vLLM picks FlashAttention 3. One import is not guarded: the samplers'
#     flashinfer_sampler_supported() (vllm/v1/sample/ops/topk_topp_sampler.py) imports the FlashInfer
#     backend unless VLLM_USE_FLASHINFER_SAMPLER=0, so set that (vLLM then samples in PyTorch).
#   nvidia-cutlass-dsl(-libs-base/-core/-cu12/-cu13), quack-kernels, nvidia-cuda-nvdisasm: CuTe-DSL kernels
#     (FA4, MoE router GEMM, Mamba/GDN, DeepSeek-V4 ops), each behind `import cutlass` in a try.
#   tokenspeed-mla, tokenspeed-triton: MLA (DeepSeek) decode kernels.
#   tilelang, z3-solver: DeepSeek-V4 mHC kernels (has_tilelang()).
#   humming-kernels, pyelftools: quantized GEMMs (has_humming()).
#   nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt, nvidia-cuda-cccl: a CUDA toolchain for those JIT kernels.
#   pynvvideocodec, torchcodec: video decoding (no video input here).
#   fastsafetensors: an optional weight loader (load_format=fastsafetensors). cuda-python: a metapackage
#     (cuda-bindings is on the machine).
DROPPED_DEPS=(flashinfer-python==0.6.14 nvidia-cudnn-frontend==1.28.0 cuda-tile==1.7.0 torch-c-dlpack-ext==0.1.5
  nvidia-cutlass-dsl==4.6.0 nvidia-cutlass-dsl-libs-base==4.6.0 nvidia-cutlass-dsl-libs-core==4.6.0
  nvidia-cutlass-dsl-libs-cu12==4.6.0 nvidia-cutlass-dsl-libs-cu13==4.6.0 quack-kernels==0.6.3
  nvidia-cuda-nvdisasm==13.5.37 tokenspeed-mla==0.1.8 tokenspeed-triton==3.9.10.post20261028 tilelang==0.1.9
  z3-solver==4.15.4.0 humming-kernels==0.1.10 pyelftools==0.33 nvidia-cuda-nvcc==13.5.37 nvidia-nvvm==13.5.37
  nvidia-cuda-crt==13.5.37 nvidia-cuda-cccl==13.3.5.0.6 pynvvideocodec==2.0.4 torchcodec==0.17.0
  fastsafetensors==0.5.0 cuda-python==13.4.4)

# Files of the vLLM wheel dropped (sizes uncompressed, MiB):
#   vllm_flash_attn/_vllm_fa2_C.abi3.so (291): FlashAttention 2, built for sm_80 only (cubins + PTX); on
#     sm_90 get_flash_attn_version() picks FA3 (_vllm_fa3_C, sm_90 cubins), for the decoder and for the
#     ViT's MMEncoderAttention alike; the FA2 import is in a try (FA2_AVAILABLE).
#   vllm_flash_attn/cute/ (2): FA4 in CuTe DSL (needs nvidia-cutlass-dsl, not carried); without it
#     FA4_AVAILABLE is False and FA3 is never "upgraded" to FA4.
#   _moe_C_stable_libtorch.abi3.so (45): fused-MoE ops only; imported under suppress(ImportError).
#   vllm-rs (41): the optional Rust frontend binary (VLLM_USE_RUST_FRONTEND=1 only).
#   _flashmla_C, _flashmla_extension_C (2): MLA, imported in try. _qutlass_C (1): sm_100 FP4, suppressed.
#   third_party/deep_gemm (35): FP8 block GEMMs (has_deep_gemm()); third_party/fmha_sm100 (30): Blackwell
#     sparse attention of MiniMax-M3; third_party/tml_fa4 (1): the Inkling model's FA4.
VLLM_TRIM=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm_flash_attn/cute vllm/_moe_C_stable_libtorch.abi3.so
  vllm/vllm-rs vllm/_flashmla_C.abi3.so vllm/_flashmla_extension_C.abi3.so vllm/_qutlass_C.abi3.so
  vllm/third_party/deep_gemm vllm/third_party/fmha_sm100 vllm/third_party/tml_fa4)

# Unsloth 2026.10.7 + unsloth_zoo 2026.10.7 + trl 1.15.0 + datasets 4.8.5 + fsspec 2026.2.0, resolved the
# same way, minus what the machine has (peft, accelerate, transformers, ...) and minus xformers 0.0.35
# (built for torch 2.10), diffusers and hf-transfer (not needed for 16-bit LoRA; import works without).
# Packages the vLLM set already carries at the same version (pydantic, msgspec, dill, ...) are left out.
UNSLOTH_DEPS=(unsloth==2026.10.7 unsloth-zoo==2026.10.7 trl==1.15.0 datasets==4.8.5 fsspec==2026.2.0
  multiprocess==0.70.19 bitsandbytes==0.50.2 structlog==26.1.0 torchao==0.18.0 cut-cross-entropy==25.1.1
  importlib-metadata==10.2.0 lazy-importer==0.1.0 nest-asyncio==1.6.0 tyro==1.0.17 typeguard==4.6.1
  tzdata==2026.6)
# studio/: Unsloth's web UI (only unsloth_cli imports it); bitsandbytes: keep the CUDA 13.0 and CPU
# libraries, drop those for CUDA 11.8-12.8/13.2, ROCm and XPU (torch 2.11+cu130 loads the cuda130 one).

pipq() { "$PY" -m pip "$@" 2>&1 | grep -v -e "is ignored" -e "Running pip as the 'root' user" || true; }
if [ "${SKIP_BUILD:-0}" != 1 ]; then
rm -rf "$WORK" && mkdir -p "$WORK"/wheels "$WORK"/wheels-u "$WORK"/vllm "$WORK"/deps "$WORK"/unsloth

echo "== download"
if [ ! -f "$VLLM_WHEEL" ]; then pipq download -q --no-deps "${PLAT[@]}" -d "$WORK/wheels-v" vllm==0.26.0; VLLM_WHEEL=$(ls "$WORK"/wheels-v/vllm-*.whl); fi
pipq download -q --no-deps "${PLAT[@]}" -d "$WORK/wheels" "${VLLM_DEPS[@]}"
pipq download -q --no-deps "${PLAT[@]}" -d "$WORK/wheels-u" "${UNSLOTH_DEPS[@]}"
echo "vllm wheel: $(du -m "$VLLM_WHEEL" | cut -f1) MB; vLLM deps: $(ls "$WORK"/wheels | wc -l) wheels, $(du -sm "$WORK"/wheels | cut -f1) MB;" \
     "Unsloth set: $(ls "$WORK"/wheels-u | wc -l) wheels, $(du -sm "$WORK"/wheels-u | cut -f1) MB"

echo "== install into target folders (no deps, no bytecode)"
pipq install -q --no-deps --no-compile "${PLAT[@]}" --target "$WORK/vllm" "$VLLM_WHEEL"
pipq install -q --no-deps --no-compile "${PLAT[@]}" --target "$WORK/deps" "$WORK"/wheels/*.whl
pipq install -q --no-deps --no-compile "${PLAT[@]}" --target "$WORK/unsloth" "$WORK"/wheels-u/*.whl
rm -rf "$WORK"/vllm/bin "$WORK"/deps/bin "$WORK"/unsloth/bin  # console scripts with this machine's python in #!
echo "installed: vllm $(du -sm "$WORK/vllm" | cut -f1) MB, deps $(du -sm "$WORK/deps" | cut -f1) MB, unsloth $(du -sm "$WORK/unsloth" | cut -f1) MB"

echo "== trim"
for p in "${VLLM_TRIM[@]}"; do echo "  drop $p ($(du -sm "$WORK/vllm/$p" | cut -f1) MB)"; rm -rf "${WORK:?}/vllm/$p"; done
"$PY" "$HERE/fatbin_prune.py" --arch 90 "$WORK/vllm/vllm/_C_stable_libtorch.abi3.so"
rm -rf "$WORK/unsloth/studio"
find "$WORK/unsloth/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
echo "trimmed: vllm $(du -sm "$WORK/vllm" | cut -f1) MB, deps $(du -sm "$WORK/deps" | cut -f1) MB, unsloth $(du -sm "$WORK/unsloth" | cut -f1) MB"

fi

echo "== pack (xz -9e, $XZ_THREADS threads) and split into pieces of at most $PART_MIB MiB"
mkdir -p "$WORK/packed" "$OUT"
for name in ${PACK:-vllm deps unsloth}; do
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$WORK/$name" -cf - . \
    | xz -9e -T"$XZ_THREADS" > "$WORK/packed/$name.tar.xz"
  echo "  $name.tar.xz: $(stat -c %s "$WORK/packed/$name.tar.xz") bytes"
done
"$PY" - "$WORK/packed" "$OUT" "$PART_MIB" <<'PYEOF'
# Cut each archive into pieces of at most PART_MIB MiB (name.tar.xz.partNN; install.sh joins them in name
# order) and fill part folders p1, p2, ... first-fit, largest piece first, each at most PART_MIB MiB.
import os, shutil, sys
src, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]) * 2**20
pieces = []
for name in sorted(os.listdir(src)):
    data = open(os.path.join(src, name), "rb").read()
    if len(data) <= limit:
        pieces.append((name, data))
    else:
        for i in range(0, len(data), limit):
            pieces.append((f"{name}.part{i // limit:02d}", data[i:i + limit]))
parts = []
for name, data in sorted(pieces, key=lambda p: -len(p[1])):
    for part in parts:
        if sum(len(d) for _, d in part) + len(data) <= limit:
            part.append((name, data)); break
    else:
        parts.append([(name, data)])
shutil.rmtree(out, ignore_errors=True)
for i, part in enumerate(parts, 1):
    os.makedirs(f"{out}/p{i}")
    for name, data in part:
        open(f"{out}/p{i}/{name}", "wb").write(data)
    print(f"p{i}: {sum(len(d) for _, d in part) / 2**20:.1f} MiB: " + ", ".join(f"{n} ({len(d) / 2**20:.1f} MiB)" for n, d in part))
PYEOF
cp "$HERE/install.sh" "$OUT/"
echo "parts in $OUT; on the device: copy each part's files to /tmp/carry (one call each), then bash install.sh"
