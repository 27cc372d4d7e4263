/*
 * frame_fuzz.c - libFuzzer harness for pccl__frame_decode.
 *
 * The input is handed to the decoder as is (libFuzzer allocates exactly
 * size bytes, so ASan sees any read past len).  Beyond "no crash, no
 * undefined behaviour", it checks two invariants: a frame is only ever
 * accepted with the right magic, and an accepted header is canonical,
 * i.e. it re-encodes to exactly the bytes it was decoded from.  A broken
 * invariant traps, which libFuzzer reports as a crash with the input.
 * Not part of the CMake build; see README.md in this folder.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "net/frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pccl__frame_header h;
    uint8_t again[PCCL__FRAME_HEADER_SIZE];
    pccl_result rv;

    rv = pccl__frame_decode(data, size, &h);
    if (rv != PCCL_OK) {
        if (rv != PCCL_EPROTO) {
            __builtin_trap();
        }
        return 0;
    }
    if (size < PCCL__FRAME_HEADER_SIZE || pccl__get_u32(data) != PCCL__FRAME_MAGIC) {
        __builtin_trap();
    }
    pccl__frame_encode(&h, again);
    if (memcmp(again, data, sizeof(again)) != 0) {
        __builtin_trap();
    }
    return 0;
}
