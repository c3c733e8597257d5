#!/usr/bin/env bash
# Fuzzes each of tcc's targets for SECONDS (default 60) with cargo-fuzz, from seeds made of
# real exports (fuzz/seeds.py) and tcc's builds of them. Stable Rust: `--sanitizer none`
# (libFuzzer's coverage-guided search without AddressSanitizer, which needs nightly; the
# runtime's tests ran once under ASan, see docs/reliability.md). A crash, a panic, a timeout
# (30 s) or more than 4 GB fails the run and leaves the input in fuzz/artifacts/TARGET/; copy
# it to fuzz/regressions/TARGET/ so that `cargo test` replays it from then on.
#
# usage: fuzz/run.sh [SECONDS]    (needs: cargo install cargo-fuzz; the test fixtures)
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
fixtures=${TCC_FIXTURES:-$HOME/.cache/tcc-fixtures}
corpus=${CARGO_TARGET_DIR:-$PWD/target}/fuzz-corpus
rm -rf "$corpus" && mkdir -p "$corpus/artifact_load"
"$fixtures/venv/bin/python" seeds.py "$fixtures" "$corpus"
for m in "$corpus"/onnx_import/*.onnx; do
    b=$(basename "$m" .onnx)
    (cd .. && cargo run -q -p tcc-compiler --bin tcc -- build "$m" -o "$corpus/artifact_load/$b.tcc" >/dev/null)
done
(cd .. && cargo run -q -p tcc-compiler --bin tcc -- build "$corpus/onnx_import/bert_micro.onnx" \
    -o "$corpus/artifact_load/bert_micro_int8.tcc" --quantize int8 >/dev/null)
for t in onnx_import artifact_load run_inputs; do
    # Earlier findings are seeds too.
    if [ -d "regressions/$t" ]; then cp regressions/"$t"/* "$corpus/$t/" 2>/dev/null || true; fi
    echo "fuzzing $t for ${secs} s from $(ls "$corpus/$t" | wc -l) seeds"
    log="$corpus/$t.log"
    set +e
    cargo fuzz run -s none "$t" "$corpus/$t" -- -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 \
        -max_len=131072 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    { grep -E "^stat::(number_of_executed_units|new_units_added|peak_rss_mb)" "$log" || true; } | tr "\n" " "; echo
    if [ $rc -ne 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz/run.sh: $t failed (exit $rc); the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
