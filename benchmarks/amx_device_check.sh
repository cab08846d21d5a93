#!/usr/bin/env bash
# The amx tier's native check, in one command, on a machine with AMX (Sapphire Rapids or later):
# the CPU's AMX flags, the amx tests run natively (including native == emulated to the bit),
# then forward and backward of qwen3-30b-a3b at T=2048 on the amx and avx512 tiers.
#   bash benchmarks/amx_device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
echo "== CPU"
grep -m1 'model name' /proc/cpuinfo
echo "AMX flags: $(grep -o 'amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
if [ ! -d .venv ]; then
    python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[test]'
else
    . .venv/bin/activate
fi
export KTGEN_CACHE_DIR="${KTGEN_CACHE_DIR:-$(mktemp -d)}"
echo "== ktgen info"
ktgen info
echo "== amx tests (native where the CPU has AMX, and the emulation)"
python -m pytest -q -rs tests/test_amx.py
status=$?
echo "== qwen3-30b-a3b, T=2048"
for tier in amx avx512; do
    echo "-- $tier"
    ktgen bench qwen3-30b-a3b --qlen 2048 --isa "$tier" --repeat 3 || status=1
done
exit $status
