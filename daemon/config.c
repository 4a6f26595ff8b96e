/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* diskchain.conf: a key file read with GLib's GKeyFile (see diskchain.conf(5)). */

#include <errno.h>
#include <stdio.h>

#include "config.h"
#include "daemon.h"

int config_load(Config *c, const char *file, char **cli_roots) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GError) err = NULL;
        GPtrArray *roots = g_ptr_array_new();
        bool have_file;

        c->max_jobs = 4;
        c->max_depth = 64;
        have_file = g_key_file_load_from_file(kf, file, G_KEY_FILE_NONE, &err);
        if (!have_file && !g_error_matches(err, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
                fprintf(stderr, "diskchaind: %s: %s\n", file, err->message);
                g_ptr_array_free(roots, TRUE);
                return -EINVAL;
        }
        if (cli_roots && cli_roots[0]) {
                for (char **r = cli_roots; *r; r++)
                        g_ptr_array_add(roots, g_strdup(*r));
        } else if (have_file && g_key_file_has_key(kf, "Storage", "Roots", NULL)) {
                g_auto(GStrv) list = g_key_file_get_string_list(kf, "Storage", "Roots", NULL, NULL);
                for (char **r = list; r && *r; r++)
                        if (**r)
                                g_ptr_array_add(roots, g_strdup(g_strstrip(*r)));
        }
        if (roots->len == 0)
                g_ptr_array_add(roots, g_strdup(DEFAULT_STORAGE_ROOT));
        for (guint i = 0; i < roots->len; i++)
                if (((char *) roots->pdata[i])[0] != '/') {
                        fprintf(stderr, "diskchaind: storage root '%s' is not an absolute path\n",
                                (char *) roots->pdata[i]);
                        g_ptr_array_free(roots, TRUE);
                        return -EINVAL;
                }
        g_ptr_array_add(roots, NULL);
        c->roots = (char **) g_ptr_array_free(roots, FALSE);
        if (have_file) {
                if (g_key_file_has_key(kf, "Limits", "MaxJobs", NULL))
                        c->max_jobs = (unsigned) g_key_file_get_uint64(kf, "Limits", "MaxJobs", NULL);
                if (g_key_file_has_key(kf, "Limits", "MaxChainDepth", NULL))
                        c->max_depth = (unsigned) g_key_file_get_uint64(kf, "Limits", "MaxChainDepth", NULL);
        }
        if (c->max_depth == 0 || c->max_depth > 255)
                c->max_depth = 64;
        return 0;
}

void config_done(Config *c) {
        g_strfreev(c->roots);
        c->roots = NULL;
}
