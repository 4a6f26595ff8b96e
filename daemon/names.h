/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The names a user gives things that become files, socket paths and bus
 * object paths (an export, a plan): 1..64 of A-Z a-z 0-9 . _ -, not
 * starting with . or - (no path separator, no option lookalike).  Shared
 * by the daemon and diskchain-plan-generator.
 */

#include <glib.h>
#include <stdbool.h>
#include <string.h>

static inline bool dc_name_valid(const char *name) {
        size_t l = strlen(name);

        if (l == 0 || l > 64 || name[0] == '.' || name[0] == '-')
                return false;
        for (const char *c = name; *c; c++)
                if (!g_ascii_isalnum(*c) && !strchr("._-", *c))
                        return false;
        return true;
}
