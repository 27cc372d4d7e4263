/*
 * testutil.h - a tiny assertion kit for the C tests.  Each test file is
 * one executable registered with CTest; a failed check prints where and
 * exits non-zero.
 */
#ifndef PCCL_TESTUTIL_H
#define PCCL_TESTUTIL_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                      \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

#define CHECK_RV(expr, want)                                               \
    do {                                                                   \
        int rv_ = (expr);                                                  \
        if (rv_ != (want)) {                                               \
            fprintf(stderr, "%s:%d: %s returned %d (%s), wanted %d\n",     \
                    __FILE__, __LINE__, #expr, rv_, pccl_strerror(rv_),    \
                    (int)(want));                                          \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

#define CHECK_OK(expr) CHECK_RV(expr, PCCL_OK)

#endif
