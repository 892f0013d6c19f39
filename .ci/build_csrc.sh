#!/usr/bin/env bash
# Build check of csrc/ for machines without a GPU (CI): compiles the routing kernels with nvcc for
# each architecture in ARCHS and prints ptxas' resource usage per kernel, checks that the torch
# binding compiles against torch's headers (a CPU-only wheel is enough), and runs the host check of
# the kernels' algorithm against the PyTorch routing. Exits non-zero on any failure; exits 0 with a
# SKIP message when nvcc is absent. Usage: .ci/build_csrc.sh (from anywhere).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CSRC="$ROOT/csrc"
ARCHS=(80 90)
PYTHON="${PYTHON:-python}"
# The language standard torch.utils.cpp_extension compiles extensions with (torch >= 2.10).
STD=c++20

if ! command -v nvcc >/dev/null 2>&1; then
  echo "SKIP: nvcc not found, csrc/ not compiled"
  exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Kernel name, registers, spills, stack and shared memory from `ptxas -v` output on stdin.
ptxas_table() {
  "$PYTHON" -c '
import re, shutil, subprocess, sys

def short(mangled):
    if shutil.which("c++filt"):
        mangled = subprocess.run(["c++filt", "-p", mangled], capture_output=True, text=True).stdout.strip()
    while re.search(r"<[^<>]*>", mangled):
        mangled = re.sub(r"<[^<>]*>", "", mangled)
    return ("cub::" if mangled.startswith("cub::") else "") + mangled.split("::")[-1]

rows, name, spills = [], None, False
for line in sys.stdin:
    if m := re.search(r"Compiling entry function \x27(\S+)\x27", line):
        name, props = short(m.group(1)), {}
    elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
        props.update(stack=m.group(1), st=m.group(2), ld=m.group(3))
        spills |= m.group(2) != "0" or m.group(3) != "0"
    elif (m := re.search(r"Used (\d+) registers", line)) and name:
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append((name, m.group(1), props["st"], props["ld"], props["stack"], smem.group(1) if smem else "0"))
        name = None
fmt = "  {:<40} {:>5} {:>9} {:>9} {:>6} {:>7}"
print(fmt.format("kernel", "regs", "spill-st", "spill-ld", "stack", "smem"))
for row in rows:
    print(fmt.format(*row))
print("  spills: " + ("YES (see above)" if spills else "none"))
'
}

echo "== nvcc: $(nvcc --version | grep -o 'release [0-9.]*')"
# One nvcc per architecture, in parallel; reports in ARCHS order.
PIDS=()
for arch in "${ARCHS[@]}"; do
  nvcc -std="$STD" -O3 --expt-relaxed-constexpr --Werror all-warnings -Xcompiler -Wall,-Wextra \
    -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -v \
    -c "$CSRC/routing.cu" -o "$WORK/routing_sm$arch.o" 2>"$WORK/ptxas_sm$arch.log" &
  PIDS+=($!)
done
for i in "${!ARCHS[@]}"; do
  arch="${ARCHS[$i]}"
  echo "== csrc/routing.cu -> sm_$arch"
  if ! wait "${PIDS[$i]}"; then
    cat "$WORK/ptxas_sm$arch.log"
    echo "FAIL: csrc/routing.cu for sm_$arch"
    exit 1
  fi
  ptxas_table <"$WORK/ptxas_sm$arch.log"
done

echo "== csrc/routing_torch.cpp against torch's headers (compiled, not linked: a CPU wheel has no CUDA libs)"
mapfile -t TORCH_INCLUDES < <("$PYTHON" -c \
  "from torch.utils.cpp_extension import include_paths; print(*include_paths(), sep='\n')")
FLAGS=()
for dir in "${TORCH_INCLUDES[@]}"; do FLAGS+=(-isystem "$dir"); done
# CPU wheels ship c10/cuda headers without the generated c10/cuda/impl/cuda_cmake_macros.h; torch's
# own switch skips it (it only sets DLL-export macros, irrelevant to an unlinked object).
if [[ ! -f "${TORCH_INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
# nvcc hands a .cpp file to the host compiler, adding the CUDA include directory.
nvcc -std="$STD" -Xcompiler -Wall,-Wextra "${FLAGS[@]}" -I"$CSRC" \
  -c "$CSRC/routing_torch.cpp" -o "$WORK/routing_torch.o"
echo "  ok"

echo "== host check of the routing algorithm (csrc/routing_host_check.cpp) against route_pairs_torch"
cd "$ROOT"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_routing.py -k host_check
