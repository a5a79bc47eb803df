#!/bin/sh
# Build the DATA decoder's C accelerator with AddressSanitizer and UBSan, then fuzz it against
# the pure-Python decoder for N seconds (default 300). Needs clang and `pip install atheris`.
set -eu
cd "$(dirname "$0")/../.."
seconds=${1:-300}
python=${PYTHON:-.venv/bin/python}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
so="$build/_speedups$suffix"
# fuzzer-no-link: libFuzzer sees the C code's branches too (coverage-guided on both sides).
clang -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,fuzzer-no-link \
    -fno-sanitize-recover=all -fPIC -shared -I"$include" slimta_tx/_speedups.c -o "$so"
mkdir -p "$build/corpus" var/fuzz  # a failing input is saved in var/fuzz/
# atheris ships the sanitizer runtime with libFuzzer built in; it must be the only ASan runtime.
runtime="$("$python" -c 'import atheris; print(atheris.path())')/asan_with_fuzzer.so"
# Python's own allocator hides overflows inside its arenas; the system malloc lets ASan see them.
PYTHONMALLOC=malloc \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
LD_PRELOAD="$runtime" \
SLIMTA_TX_SPEEDUPS="$so" \
    "$python" tests/fuzz/fuzz_decoder.py -max_total_time="$seconds" -max_len=4096 \
    -artifact_prefix=var/fuzz/ "$build/corpus"
