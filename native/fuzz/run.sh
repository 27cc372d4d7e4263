#!/bin/sh
# run.sh SECONDS [HARNESS...] - build the libFuzzer harnesses, replay the
# regression corpus, fuzz each harness for SECONDS, report executions and
# coverage.  A crash is copied into native/fuzz/regressions/<harness>/ (so
# it is replayed by every later run) and fails the run.  Run from the
# repository root (the Makefile's fuzz and fuzz-smoke targets do).
set -eu

SECONDS_PER=${1:-20}
shift || true
HARNESSES=${*:-"frame_fuzz handshake_fuzz rx_fuzz coll_fuzz p2p_fuzz"}
OUT=build/fuzz
SRC=native
CC=${FUZZ_CC:-clang}
CF="-g -O1 -std=c99 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE -Wall -Wextra -Werror
    -fno-omit-frame-pointer -I$SRC/include -I$SRC/src"
SAN="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all"

loud() { printf '\n********************************************************\n'; \
         printf '*** %s\n' "$@"; \
         printf '********************************************************\n\n'; }

can_fuzz() {
    command -v "$CC" >/dev/null 2>&1 || return 1
    printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n){(void)d;(void)n;return 0;}\n' \
        >"$OUT/probe.c"
    "$CC" -fsanitize=fuzzer "$OUT/probe.c" -o "$OUT/probe" >/dev/null 2>&1
}

mkdir -p "$OUT"
if ! can_fuzz; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "clang with libFuzzer missing: installing clang libclang-rt-14-dev with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang libclang-rt-14-dev
    else
        loud "FUZZING SKIPPED: no clang with libFuzzer and no apt-get (as root) to install it" \
             "install clang + libclang-rt (Debian: apt-get install clang libclang-rt-14-dev)"
        exit 0
    fi
    can_fuzz || { loud "FUZZING FAILED: clang still cannot link -fsanitize=fuzzer"; exit 1; }
fi

# The receive paths of broadcast, all-gather and reduce-scatter.
COLL_SRCS="$SRC/src/net/conn.c $SRC/src/net/frame.c $SRC/src/coll/allreduce_ring.c $SRC/src/coll/stripe.c
    $SRC/src/coll/reducescatter_ring.c $SRC/src/coll/allgather_ring.c
    $SRC/src/coll/broadcast_ring.c $SRC/src/coll/kernels.c $SRC/src/coll/quant.c
    $SRC/src/platform/posix/socket.c $SRC/src/platform/posix/thread.c
    $SRC/src/core/result.c -lpthread"

build() {
    case $1 in
    frame_fuzz) set -- "$1" $SRC/src/net/frame.c $SRC/src/core/result.c ;;
    handshake_fuzz) set -- "$1" $SRC/src/net/handshake.c $SRC/src/net/frame.c \
                        $SRC/src/core/result.c -lcrypto ;;
    rx_fuzz) set -- "$1" $SRC/src/net/conn.c $SRC/src/net/frame.c \
                 $SRC/src/coll/allreduce_ring.c $SRC/src/coll/stripe.c $SRC/src/coll/kernels.c $SRC/src/coll/quant.c \
                 $SRC/src/platform/posix/socket.c $SRC/src/platform/posix/thread.c \
                 $SRC/src/core/result.c -lpthread ;;
    coll_fuzz) set -- "$1" $COLL_SRCS ;;
    p2p_fuzz) set -- "$1" $(find $SRC/src -name '*.c' | sort) -lcrypto -lpthread ;;
    *) echo "unknown harness $1" >&2; exit 2 ;;
    esac
    h=$1; shift
    # shellcheck disable=SC2086
    $CC $CF $SAN "$SRC/fuzz/$h.c" "$@" -lm -o "$OUT/$h"
}

status=0
summary=""
for h in $HARNESSES; do
    echo "== $h: build"
    build "$h"
    corpus="$OUT/corpus/$h"
    regress="$SRC/fuzz/regressions/$h"
    mkdir -p "$corpus" "$OUT/artifacts"
    if [ "$h" = rx_fuzz ] && [ -z "$(ls -A "$corpus")" ]; then
        # Valid frame streams from an in-memory ring, so fuzzing starts deep.
        # shellcheck disable=SC2086
        $CC $CF -DRX_FUZZ_SEEDS -fsanitize=address,undefined "$SRC/fuzz/rx_fuzz.c" \
            $SRC/src/net/conn.c $SRC/src/net/frame.c $SRC/src/coll/allreduce_ring.c $SRC/src/coll/stripe.c \
            $SRC/src/coll/kernels.c $SRC/src/coll/quant.c $SRC/src/platform/posix/socket.c \
            $SRC/src/platform/posix/thread.c $SRC/src/core/result.c -lpthread -lm \
            -o "$OUT/rx_seeds"
        "$OUT/rx_seeds" "$corpus"
    fi
    if [ "$h" = coll_fuzz ] && [ -z "$(ls -A "$corpus")" ]; then
        # shellcheck disable=SC2086
        $CC $CF -DCOLL_FUZZ_SEEDS -fsanitize=address,undefined "$SRC/fuzz/coll_fuzz.c" \
            $COLL_SRCS -lm -o "$OUT/coll_seeds"
        "$OUT/coll_seeds" "$corpus"
    fi
    if [ "$h" = p2p_fuzz ] && [ -z "$(ls -A "$corpus")" ]; then
        # Valid point-to-point streams, so fuzzing starts past the schedule.
        # shellcheck disable=SC2086
        $CC $CF -DP2P_FUZZ_SEEDS -fsanitize=address,undefined "$SRC/fuzz/p2p_fuzz.c" \
            $SRC/src/net/frame.c $SRC/src/core/result.c -lm -o "$OUT/p2p_seeds"
        "$OUT/p2p_seeds" "$corpus"
    fi
    if [ -d "$regress" ] && [ -n "$(ls "$regress")" ]; then
        echo "== $h: replay $(ls "$regress" | wc -l) regression inputs"
        "$OUT/$h" "$regress"/* >"$OUT/$h.replay.log" 2>&1 || {
            tail -40 "$OUT/$h.replay.log"; echo "REGRESSION: $h crashes on a stored input"
            status=1; continue; }
    fi
    echo "== $h: fuzz ${SECONDS_PER}s"
    log="$OUT/$h.log"
    set +e
    "$OUT/$h" -max_total_time="$SECONDS_PER" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$OUT/artifacts/$h-" "$corpus" >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    units=$(ls "$corpus" | wc -l)
    if [ $rc -ne 0 ]; then
        tail -60 "$log"
        mkdir -p "$regress"
        for a in "$OUT/artifacts/$h-"*; do
            [ -e "$a" ] && cp "$a" "$regress/" && echo "saved $a as a regression input in $regress/"
        done
        status=1
        summary="$summary$(printf '%-15s CRASH (rc %s) after %s execs' "$h" "$rc" "${execs:-?}")\n"
    else
        summary="$summary$(printf '%-15s %10s execs  cov %5s  features %6s  corpus %5s' \
            "$h" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$units")\n"
    fi
done
printf '\nfuzzing summary (%ss per harness):\n%b' "$SECONDS_PER" "$summary"
exit $status
