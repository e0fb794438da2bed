#!/usr/bin/env bash
# install.sh: on the GPU machine, join the carried parts found under /tmp/carry and unpack them into
# /tmp/site, then print versions and check that vllm, unsloth and trl import (PYTHONPATH=/tmp/site).
#
# Why parts: that machine has no network and one device `run` call carries at most 64 MiB, so
# bench/carry/pack.sh (run here, with PyPI) packs vLLM 0.26.0, Unsloth 2026.10.7 and TRL 1.15.0 with the
# dependencies the machine lacks into xz archives cut into parts of at most 58 MiB. Each part goes in its
# own call, back to back (files under /tmp survive while the machine stays warm, ~30 s after a call), each
# call copying its part to /tmp/carry; the last call runs this script.
#   bash install.sh                 # CARRY=/tmp/carry SITE=/tmp/site by default
#   export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0   # then: python3 -c "import vllm"
# VLLM_USE_FLASHINFER_SAMPLER=0: the carry leaves flashinfer out (pack.sh says why) and vLLM 0.26's samplers
# import its FlashInfer backend unless this is 0 (seen: "No module named 'flashinfer'" at engine start).
# IMPORT_CHECK=0 skips the import check (~35 s of device time) where it was already seen to pass.
set -euo pipefail
CARRY=${CARRY:-/tmp/carry}
SITE=${SITE:-/tmp/site}
mkdir -p "$SITE"
unxz() {  # xz -dc, or Python's lzma where the image has no xz
  if command -v xz >/dev/null; then xz -dc; else python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)"; fi
}
start=$(date +%s)
cd "$CARRY"
bases=$(ls | sed -n 's/^\(.*\.tar\.xz\)\(\.part[0-9][0-9]\)\{0,1\}$/\1/p' | sort -u)
[ -n "$bases" ] || { echo "install.sh: no *.tar.xz parts under $CARRY" >&2; exit 1; }
for base in $bases; do
  if [ -f "$base" ]; then
    files=("$base")
  else
    mapfile -t files < <(ls "$base".part?? | sort)
    n=${#files[@]}  # pieces must be part00..part(n-1), none missing
    [ "${files[$((n - 1))]}" = "$base.part$(printf %02d $((n - 1)))" ] || { echo "install.sh: a piece of $base is missing: ${files[*]}" >&2; exit 1; }
  fi
  cat "${files[@]}" | unxz | tar -xf - -C "$SITE"
  echo "unpacked $base from ${#files[@]} piece(s), $(cat "${files[@]}" | wc -c) bytes"
done
echo "unpacked into $SITE in $(( $(date +%s) - start )) s: $(du -sm "$SITE" | cut -f1) MB"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
python3 - <<'PY'
import importlib.metadata as md
names = ["vllm", "unsloth", "unsloth_zoo", "trl", "datasets", "xgrammar", "torch", "torchvision",
         "transformers", "peft", "accelerate", "triton", "numpy"]
for n in names:
    try:
        print(f"  {n:14s} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  {n:14s} (not installed)")
PY
[ "${IMPORT_CHECK:-1}" = 0 ] && exit 0
python3 -c "import unsloth, trl, vllm; print('import check: vllm', vllm.__version__, '| unsloth', unsloth.__version__, '| trl', trl.__version__)" || {
  for m in vllm trl unsloth; do python3 -c "import $m; print('import $m: ok')" 2>&1 | tail -4; done; exit 1; }
