#!/usr/bin/env bash
# Checks every NVRTC kernel of moe-gpu on a machine without a GPU: compiles the modules with
# NVRTC (`moe-verify kernels`) and assembles each with ptxas for its architecture, printing
# every kernel's registers and spills; exits 1 on an assembly error or a kernel that spills
# (a spill in a GEMM or quantization kernel is a performance bug to see before device time).
# Installs the pinned NVRTC and ptxas (PyPI wheels nvidia-cuda-nvrtc / nvidia-cuda-nvcc, the
# same CUDA release, so ptxas reads the PTX version NVRTC writes) into target/kernel-check-venv
# on first use. Usage: scripts/kernel-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_WHEELS=13.0.*
venv=target/kernel-check-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q "nvidia-cuda-nvrtc==$CUDA_WHEELS" "nvidia-cuda-nvcc==$CUDA_WHEELS"
nv="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
export LD_LIBRARY_PATH="$nv/lib:${LD_LIBRARY_PATH:-}"
out=target/kernel-check
rm -rf "$out"; mkdir -p "$out"
cargo run --release --quiet -- kernels --ptx-dir "$out/ptx"
status=0
for ptx in "$out"/ptx/*.ptx; do
  base="$(basename "$ptx" .ptx)"; arch="${base##*.}"
  log="$out/$base.ptxas.log"
  if ! "$nv/bin/ptxas" -arch="$arch" -v "$ptx" -o "$out/$base.cubin" > "$log" 2>&1; then
    echo "FAIL $base: ptxas error"; grep -iE "error" "$log" | head -5; status=1; continue
  fi
  python3 scripts/ptxas_report.py "$log" "$base" || status=1
done
[ "$status" -eq 0 ] && echo "kernel-check: every kernel assembles without spills" || echo "kernel-check: FAILED"
exit "$status"
