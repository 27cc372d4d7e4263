/* result.c - result codes to text, and small pure helpers of the API. */
#include <string.h>

#include "pccl.h"

const char *
pccl_strerror(pccl_result rv)
{
    static const char *const text[] = {
        [PCCL_OK] = "success",
        [PCCL_EINVAL] = "invalid argument",
        [PCCL_ENOMEM] = "out of memory",
        [PCCL_ETIMEDOUT] = "timed out",
        [PCCL_EABORTED] = "operation aborted",
        [PCCL_ECLOSED] = "communicator closed",
        [PCCL_EPEERLOST] = "ring neighbour lost (connection closed or reset)",
        [PCCL_EPROTO] = "protocol error (malformed, out-of-range or stale frame)",
        [PCCL_EAUTH] = "authentication failed",
        [PCCL_ESTATE] = "call not valid in the current state",
        [PCCL_EBUSY] = "tag already in flight",
        [PCCL_ENOTSUP] = "not supported",
        [PCCL_EADDR] = "bad or unusable address",
        [PCCL_ECONNREFUSED] = "connection refused",
        [PCCL_ERINGBROKEN] = "ring broken by an earlier failure; set the ring again",
        [PCCL_ENOTFOUND] = "nothing is published under that key",
    };
    if (rv & PCCL_ESYSERR) {
        /* strerror() is not thread-safe; a fixed text keeps this static. */
        return "operating system error (code = PCCL_ESYSERR | errno)";
    }
    if (rv >= 0 && (size_t)rv < sizeof(text) / sizeof(text[0]) && text[rv] != NULL) {
        return text[rv];
    }
    return "unknown error";
}

/* The build passes the version from its one source, pyproject.toml
 * (native/CMakeLists.txt).  Only builds outside CMake (the fuzz harnesses)
 * lack it. */
#ifndef PCCL_VERSION_STRING
#define PCCL_VERSION_STRING "0+unknown"
#endif

const char *
pccl_version(void)
{
    return PCCL_VERSION_STRING;
}

pccl_result
pccl_dtype_size(pccl_dtype dtype, size_t *size)
{
    static const size_t sizes[PCCL_DTYPE_COUNT] = {
        [PCCL_FLOAT32] = 4, [PCCL_FLOAT64] = 8, [PCCL_FLOAT16] = 2,
        [PCCL_BFLOAT16] = 2, [PCCL_INT8] = 1, [PCCL_INT16] = 2,
        [PCCL_INT32] = 4, [PCCL_INT64] = 8, [PCCL_UINT8] = 1,
    };
    if ((unsigned)dtype >= PCCL_DTYPE_COUNT || size == NULL) {
        return PCCL_EINVAL;
    }
    *size = sizes[dtype];
    return PCCL_OK;
}
