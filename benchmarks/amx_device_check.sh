#!/usr/bin/env bash
# The amx and avx512bf16 tiers' native check, in one command, on a machine with AMX (Sapphire
# Rapids or later):
#   bash benchmarks/amx_device_check.sh [OUT_DIR]
# 1. the CPU's flags; 2. the native tests of amx and avx512bf16, native == emulated to the bit
# included; 3. `ktgen bench qwen3-30b-a3b` at T = 128, 512 and 2048 on amx, avx512bf16 and avx512,
# the PyTorch baselines and the torch bf16 / fp32 matmul roofs in the amx run of each T, every
# figure written as JSON to OUT_DIR (default bench-out/). About 5 minutes on 16 cores.
#
# Nothing is fetched from the network. Python packages the machine lacks come as wheels in a
# folder of the working tree that .git/info/exclude ignores (e.g. wheels/), brought from a
# machine with the same Python:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d wheels cffi pycparser pydantic pydantic-core annotated-types typing-inspection typing-extensions
# This script installs them with `pip --target` and puts the repository on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-out}"
mkdir -p "$OUT"
echo "== CPU"
grep -m1 'model name' /proc/cpuinfo
echo "flags: $(grep -m1 -o -E '(amx[a-z0-9_]*|avx512_bf16|avx512_fp16|avx512_vnni|avx512f)' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "cores: $(nproc)"
if ! python3 -c "import cffi, pydantic" 2>/dev/null; then
    if [ -d wheels ]; then
        python3 -m pip install -q --no-index --target .pydeps wheels/*.whl
        export PYTHONPATH="$PWD/.pydeps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "cffi or pydantic is missing and there is no wheels/ folder: see the header of this script" >&2
        exit 2
    fi
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export KTGEN_CACHE_DIR="${KTGEN_CACHE_DIR:-$(mktemp -d)}"
KTGEN="python3 -m ktgen"
echo "== ktgen info"
$KTGEN info
echo "== native tests: amx, avx512bf16 (tiles and lanes against the measured arithmetic, native == emulated)"
python3 -m pytest -q -rs -p no:cacheprovider tests/tiers/test_amx.py tests/tiers/test_amx_tiles.py tests/tiers/test_avx512bf16.py
status=$?
for T in 128 512 2048; do
    for tier in amx avx512bf16 avx512; do
        echo "== qwen3-30b-a3b, T=$T, $tier"
        extra="--no-torch"
        [ "$tier" = amx ] && extra="--torch-budget 5"
        $KTGEN bench qwen3-30b-a3b --qlen "$T" --isa "$tier" --repeat 3 $extra --json "$OUT/bench-$tier-$T.json" \
            || status=1
    done
done
echo "== JSON in $OUT/"
exit $status
