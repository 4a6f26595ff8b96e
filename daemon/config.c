/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* diskchain.conf: a key file read with GLib's GKeyFile (see diskchain.conf(5)). */

#include <errno.h>
#include <stdio.h>
#include <sys/socket.h>

#include "config.h"
#include "daemon.h"

static unsigned get_uint(GKeyFile *kf, const char *group, const char *key, unsigned def, unsigned min,
                         unsigned max) {
        g_autoptr(GError) err = NULL;
        guint64 v;

        if (!kf || !g_key_file_has_key(kf, group, key, NULL))
                return def;
        v = g_key_file_get_uint64(kf, group, key, &err);
        if (err || v < min || v > max) {
                log_warning("[%s] %s= must be %u..%u; using %u", group, key, min, max, def);
                return def;
        }
        return (unsigned) v;
}

static bool inside(const char *path, const char *dir) {
        size_t l = strlen(dir);
        while (l > 1 && dir[l - 1] == '/')
                l--;
        return strncmp(path, dir, l) == 0 && (path[l] == '/' || path[l] == 0);
}

/* yes/no, as systemd's files say it (true/false, on/off, 1/0 too). */
static bool get_bool(GKeyFile *kf, const char *group, const char *key, bool def) {
        g_autofree char *v = kf ? g_key_file_get_string(kf, group, key, NULL) : NULL;

        if (!v)
                return def;
        g_strstrip(v);
        if (!g_ascii_strcasecmp(v, "yes") || !g_ascii_strcasecmp(v, "true") || !g_ascii_strcasecmp(v, "on") ||
            !strcmp(v, "1"))
                return true;
        if (!g_ascii_strcasecmp(v, "no") || !g_ascii_strcasecmp(v, "false") || !g_ascii_strcasecmp(v, "off") ||
            !strcmp(v, "0"))
                return false;
        log_warning("[%s] %s=%s must be yes or no; using %s", group, key, v, def ? "yes" : "no");
        return def;
}

static char *get_path(GKeyFile *kf, const char *group, const char *key) {
        g_autofree char *v = kf ? g_key_file_get_string(kf, group, key, NULL) : NULL;

        if (!v || !*g_strstrip(v))
                return NULL;
        if (v[0] != '/') {
                log_warning("[%s] %s=%s is not an absolute path: ignored", group, key, v);
                return NULL;
        }
        return g_canonicalize_filename(v, "/");
}

/* [NBD] TCPListen= and TLS: off unless TCPListen= names at least one valid address. */
static void load_tcp(Config *c, GKeyFile *kf) {
        g_autofree char *list = kf ? g_key_file_get_string(kf, "NBD", "TCPListen", NULL) : NULL;
        g_auto(GStrv) words = list ? g_strsplit_set(list, " \t,", -1) : NULL;
        GPtrArray *a = g_ptr_array_new();

        for (char **w = words; w && *w; w++) {
                struct sockaddr_storage ss;
                socklen_t len;
                bool port;
                if (!**w)
                        continue;
                if (tcp_address_parse(*w, false, &ss, &len, &port) < 0) {
                        log_warning("[NBD] TCPListen=: '%s' is not ADDRESS or ADDRESS:PORT (IPv4, or [IPv6]): ignored",
                                    *w);
                        continue;
                }
                g_ptr_array_add(a, g_strdup(*w));
        }
        if (a->len == 0) {
                g_ptr_array_free(a, TRUE);
                c->tcp_listen = NULL;
        } else {
                g_ptr_array_add(a, NULL);
                c->tcp_listen = (char **) g_ptr_array_free(a, FALSE);
        }
        c->tcp_plaintext_loopback = get_bool(kf, "NBD", "TCPPlaintextLoopback", false);
        c->tls_dir = get_path(kf, "NBD", "TLSCredentials");
        c->tls_psk_file = get_path(kf, "NBD", "TLSPSKFile");
        c->tls_verify_peer = get_bool(kf, "NBD", "TLSVerifyPeer", true);
}

int config_load(Config *c, const char *file, char **cli_roots, const char *cli_state_dir,
                const char *cli_runtime_dir) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GError) err = NULL;
        g_autofree char *state = NULL;
        GPtrArray *roots = g_ptr_array_new();
        bool have_file;

        have_file = g_key_file_load_from_file(kf, file, G_KEY_FILE_NONE, &err);
        if (!have_file && !g_error_matches(err, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
                log_error("%s: %s", file, err->message);
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
                        log_error("storage root '%s' is not an absolute path", (char *) roots->pdata[i]);
                        g_ptr_array_free(roots, TRUE);
                        return -EINVAL;
                }
        g_ptr_array_add(roots, NULL);
        c->roots = (char **) g_ptr_array_free(roots, FALSE);

        if (cli_state_dir)
                state = g_strdup(cli_state_dir);
        else if (have_file && g_key_file_has_key(kf, "Storage", "StateDirectory", NULL))
                state = g_strstrip(g_key_file_get_string(kf, "Storage", "StateDirectory", NULL));
        else
                state = g_strdup(DEFAULT_STATE_DIR);
        if (state[0] != '/') {
                log_error("state directory '%s' is not an absolute path", state);
                return -EINVAL;
        }
        /* The records decide what every file is: nobody who can write a
         * storage root may be able to write them. */
        for (char **r = c->roots; *r; r++)
                if (inside(state, *r)) {
                        log_error("state directory '%s' is inside the storage root '%s'", state, *r);
                        return -EINVAL;
                }
        c->state_dir = g_canonicalize_filename(state, "/");
        if (cli_runtime_dir)
                c->runtime_dir = g_canonicalize_filename(cli_runtime_dir, "/");
        else if (have_file && g_key_file_has_key(kf, "Storage", "RuntimeDirectory", NULL)) {
                g_autofree char *rt = g_strstrip(g_key_file_get_string(kf, "Storage", "RuntimeDirectory", NULL));
                if (rt[0] != '/') {
                        log_error("runtime directory '%s' is not an absolute path", rt);
                        return -EINVAL;
                }
                c->runtime_dir = g_canonicalize_filename(rt, "/");
        } else
                c->runtime_dir = g_strdup(DEFAULT_RUNTIME_DIR);

        c->max_jobs = get_uint(have_file ? kf : NULL, "Limits", "MaxJobs", 4, 1, 64);
        c->max_depth = get_uint(have_file ? kf : NULL, "Limits", "MaxChainDepth", 64, 1, 255);
        c->workers = get_uint(have_file ? kf : NULL, "Limits", "Workers", 4, 1, 64);
        c->max_operations = get_uint(have_file ? kf : NULL, "Limits", "MaxOperations", 64, 1, 4096);
        c->max_exports = get_uint(have_file ? kf : NULL, "NBD", "MaxExports", 64, 1, 1024);
        c->max_connections = get_uint(have_file ? kf : NULL, "NBD", "MaxConnections", 16, 1, 1024);
        if (have_file && g_key_file_has_key(kf, "Remote", "TLSCertificates", NULL))
                c->remote_tls_certificates = g_strstrip(g_key_file_get_string(kf, "Remote", "TLSCertificates", NULL));
        if (have_file && g_key_file_has_key(kf, "Remote", "TLSPSKFile", NULL))
                c->remote_tls_psk_file = g_strstrip(g_key_file_get_string(kf, "Remote", "TLSPSKFile", NULL));
        load_tcp(c, have_file ? kf : NULL);
        c->plans_dir = get_path(have_file ? kf : NULL, "Plans", "Directory");
        if (!c->plans_dir)
                c->plans_dir = g_strdup(DEFAULT_PLANS_DIR);
        return 0;
}

void config_done(Config *c) {
        g_strfreev(c->roots);
        c->roots = NULL;
        g_free(c->state_dir);
        c->state_dir = NULL;
        g_free(c->runtime_dir);
        c->runtime_dir = NULL;
        g_free(c->remote_tls_certificates);
        c->remote_tls_certificates = NULL;
        g_free(c->remote_tls_psk_file);
        c->remote_tls_psk_file = NULL;
        g_strfreev(c->tcp_listen);
        c->tcp_listen = NULL;
        g_free(c->tls_dir);
        c->tls_dir = NULL;
        g_free(c->tls_psk_file);
        c->tls_psk_file = NULL;
        g_free(c->plans_dir);
        c->plans_dir = NULL;
}
