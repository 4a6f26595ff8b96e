/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * CHECK() for the C unit tests: count checks and failures, say which failed
 * and go on.  A test defines CHECK_DETAIL() before including this to add
 * what explains a failure (test-lib: the library's last error message).
 */

#include <stdio.h>

static int failures, checks;

#ifndef CHECK_DETAIL
#define CHECK_DETAIL() NULL
#endif

#define CHECK(cond)                                                                   \
        do {                                                                          \
                checks++;                                                             \
                if (!(cond))                                                          \
                        check_failed(__FILE__, __LINE__, #cond, CHECK_DETAIL());      \
        } while (0)

static inline void check_failed(const char *file, int line, const char *cond, const char *detail) {
        failures++;
        fprintf(stderr, "%s:%d: CHECK(%s) failed%s%s%s\n", file, line, cond, detail ? " (last error: " : "",
                detail ? detail : "", detail ? ")" : "");
}

/* The line a test ends with, and its exit status. */
static inline int check_report(const char *name) {
        printf("%s: %d checks, %d failed\n", name, checks, failures);
        return failures ? 1 : 0;
}
