/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Backup plans: PLANS_DIR/NAME.conf (diskchain.plan(5)), their catalogs of
 * restore points, runs, retention, verification and restores.
 *
 * Design notes
 * ------------
 * - A plan file says what to back up, where, when and how much to keep;
 *   the daemon reads every plan at start and writes one when a caller
 *   creates or changes it over the bus (atomically: a temporary file,
 *   renamed).  systemd learns the schedules from the same files through
 *   diskchain-plan-generator, which the daemon asks systemd to re-run
 *   (Reload) after a change.
 * - The catalog (STATE_DIR/plans/NAME.catalog, a key file written
 *   atomically and durably) lists the restore points: time, level, file,
 *   the point it is an overlay of, size, what the run copied, the SHA-256
 *   of every 64 MiB of the file, and the verified state.  It is the
 *   daemon's (root's) own: a user who can write the destination cannot
 *   forge it, and Verify catches a changed backup file.
 * - A run is a Backup job (a Job on the bus, Run's answer) into a new file
 *   DESTINATION/NAME-ID-LEVEL.qcow2: a full one over nothing, anchoring the
 *   plan's bitmap at its point in time (replacing it: an inconsistent one
 *   too); an incremental one over the previous point, from the bitmap
 *   (bitmap-mode on-success, so the bitmap starts again); a differential
 *   one over the last full point, from the bitmap without resetting it.
 *   The file is recorded as pending before the job starts; when the job
 *   concludes it becomes a point (its checksums taken on a worker) or is
 *   removed, and an interrupted run's pending file is removed by the next.
 * - Runs of one plan never overlap (Running, PlanRunning for a second
 *   Run); prune and verify hold the plan busy too.
 * - Retention follows restic's policy (internal/data/snapshot_policy.go:
 *   keep-last/hourly/daily/weekly/monthly/yearly, newest first, a point
 *   kept when it opens a new period of any rule that still has periods to
 *   give, and the oldest point while any rule has; periods in local time,
 *   ISO weeks), keeps everything without a rule (as Proxmox; restic
 *   refuses), and always keeps the newest point, which the next
 *   incremental builds on.  A point that goes
 *   while later points are overlays of it is first streamed into each of
 *   them (the library's stream job: its data copied into them, their
 *   backing moved below it), newest removed point first, so that every
 *   kept point still restores; only then is its file deleted.
 * - The plans' clock is the real time, or, for tests only, the number of
 *   seconds since the epoch in the file DISKCHAIN_TEST_CLOCK_FILE names.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"

#define CHUNK (UINT64_C(64) << 20)

static const char *const level_names[] = { [LEVEL_FULL] = "full", [LEVEL_INCREMENTAL] = "incremental",
                                           [LEVEL_DIFFERENTIAL] = "differential", [LEVEL_AUTO] = "auto", NULL };
static const char *const state_names[] = { [POINT_UNVERIFIED] = "unverified", [POINT_VERIFIED] = "verified",
                                           [POINT_DAMAGED] = "damaged", NULL };
const char *const plan_keep_keys[] = { "KeepLast", "KeepHourly", "KeepDaily", "KeepWeekly", "KeepMonthly",
                                       "KeepYearly", NULL };

const char *plan_level_name(int level) {
        return level >= 0 && level <= LEVEL_AUTO ? level_names[level] : "?";
}

const char *plan_state_name(int state) {
        return state >= 0 && state <= POINT_DAMAGED ? state_names[state] : "?";
}

int plan_level_from(const char *s) {
        for (int i = 0; level_names[i]; i++)
                if (strcmp(level_names[i], s) == 0)
                        return i;
        return -1;
}

uint64_t plan_now(void) {
        const char *f = getenv("DISKCHAIN_TEST_CLOCK_FILE");
        g_autofree char *text = NULL;
        struct timespec ts;

        if (f && g_file_get_contents(f, &text, NULL, NULL)) {
                guint64 v = g_ascii_strtoull(g_strstrip(text), NULL, 10);
                if (v)
                        return v * 1000000;
        }
        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}

struct dc_nbd_client_options plan_nbd_options(Manager *mgr) {
        return (struct dc_nbd_client_options){ .tls_certificates = mgr->config.remote_tls_certificates,
                                               .tls_psk_file = mgr->config.remote_tls_psk_file };
}

bool plan_replica(const PlanSettings *s) {
        return s->destination && dc_nbd_uri_is(s->destination);
}

bool plan_name_valid(const char *name) {
        return dc_name_valid(name);
}

void point_free(void *p) {
        Point *x = p;
        if (!x)
                return;
        free(x->id);
        free(x->file);
        free(x->base);
        free(x->sums);
        free(x->error);
        free(x);
}

Point *plan_point(Plan *p, const char *id) {
        for (guint i = 0; i < p->points->len; i++) {
                Point *x = p->points->pdata[i];
                if (strcmp(x->id, id) == 0)
                        return x;
        }
        return NULL;
}

void plan_settings_clear(PlanSettings *s) {
        free(s->chain);
        free(s->destination);
        free(s->schedule);
        free(s->bitmap);
        *s = (PlanSettings){ 0 };
}

Plan *plan_free(Plan *p) {
        if (!p)
                return NULL;
        free(p->name);
        free(p->object);
        free(p->file);
        free(p->catalog);
        plan_settings_clear(&p->set);
        if (p->points)
                g_ptr_array_free(p->points, TRUE);
        free(p->last_result);
        free(p->pending);
        free(p->job_id);
        free(p->run_id);
        free(p->run_file);
        free(p->run_base);
        free(p->run_fleece);
        point_free(p->run_replaced);
        free(p);
        return NULL;
}

void plan_free_void(void *p) {
        plan_free(p);
}

/* --- settings: the plan file ------------------------------------------------------------------ */

/* S's values, checked; an error names the plan file's key. */
int plan_settings_check(Manager *mgr, const char *name, PlanSettings *s, char **ret_error) {
        _cleanup_free_ char *dest = NULL;

        *ret_error = NULL;
        if (!s->chain || !*s->chain) {
                *ret_error = g_strdup_printf("plan '%s': Chain= names no image", name);
                return -EINVAL;
        }
        if (plan_replica(s)) {
                /* a replica: one export, updated in place by every run (see the notes) */
                _cleanup_free_ char *normal = NULL;
                if (dc_nbd_uri_normalize(s->destination, false, &normal, NULL) < 0) {
                        *ret_error = g_strdup_printf("plan '%s': Destination=%s: %s", name, s->destination,
                                                     dc_get_error());
                        dc_error_clear();
                        return -EINVAL;
                }
                free(s->destination);
                s->destination = TAKE_PTR(normal);
                if (s->compress) {
                        *ret_error = g_strdup_printf("plan '%s': Compress=yes writes qcow2 compressed clusters, which "
                                                     "the NBD export %s does not have", name, s->destination);
                        return -EINVAL;
                }
                if (s->level == LEVEL_DIFFERENTIAL) {
                        *ret_error = g_strdup_printf("plan '%s': a replica (%s) is updated in place, so it holds no "
                                                     "full point to build a differential on: Level=incremental or "
                                                     "auto", name, s->destination);
                        return -EINVAL;
                }
                for (int i = 0; i < KEEP_N; i++)
                        if (s->keep[i]) {
                                *ret_error = g_strdup_printf("plan '%s': %s=: a replica (%s) holds one restore point, "
                                                             "its latest state; retention needs a directory",
                                                             name, plan_keep_keys[i], s->destination);
                                return -EINVAL;
                        }
        } else if (!s->destination || s->destination[0] != '/') {
                *ret_error = g_strdup_printf("plan '%s': Destination= must be an absolute directory or an NBD URI",
                                             name);
                return -EINVAL;
        } else {
                /* inside a root: the directory itself need not exist yet */
                bool inside = false;
                for (char **r = mgr->config.roots; *r && !inside; r++) {
                        size_t l = strlen(*r);
                        inside = strncmp(s->destination, *r, l) == 0 && (s->destination[l] == '/' || !s->destination[l]);
                }
                if (!inside || strstr(s->destination, "/../") || g_str_has_suffix(s->destination, "/..")) {
                        *ret_error = g_strdup_printf("plan '%s': Destination=%s is not inside the storage roots", name,
                                                     s->destination);
                        return -EPERM;
                }
        }
        if (!s->schedule || !*s->schedule || strpbrk(s->schedule, "\n\r")) {
                *ret_error = g_strdup_printf("plan '%s': Schedule= is empty", name);
                return -EINVAL;
        }
        if (s->level < 0 || s->level > LEVEL_AUTO) {
                *ret_error = g_strdup_printf("plan '%s': Level= must be full, incremental, differential or auto", name);
                return -EINVAL;
        }
        if (s->full_every < 1 || s->full_every > 100000) {
                *ret_error = g_strdup_printf("plan '%s': FullEvery= must be 1..100000", name);
                return -EINVAL;
        }
        if (!s->bitmap || !*s->bitmap || strlen(s->bitmap) > 1023) {
                *ret_error = g_strdup_printf("plan '%s': Bitmap= must be a name of 1..1023 bytes", name);
                return -EINVAL;
        }
        if (s->randomized_delay > 7 * 24 * 3600) {
                *ret_error = g_strdup_printf("plan '%s': RandomizedDelaySec= is at most a week", name);
                return -EINVAL;
        }
        return 0;
}

static unsigned kf_uint(GKeyFile *kf, const char *group, const char *key, unsigned def, bool *bad) {
        g_autoptr(GError) err = NULL;
        guint64 v;

        if (!g_key_file_has_key(kf, group, key, NULL))
                return def;
        v = g_key_file_get_uint64(kf, group, key, &err);
        if (err || v > UINT32_MAX) {
                *bad = true;
                return def;
        }
        return (unsigned) v;
}

static bool parse_bool(const char *v, bool *ret) {
        if (!g_ascii_strcasecmp(v, "yes") || !g_ascii_strcasecmp(v, "true") || !g_ascii_strcasecmp(v, "on") ||
            !strcmp(v, "1"))
                *ret = true;
        else if (!g_ascii_strcasecmp(v, "no") || !g_ascii_strcasecmp(v, "false") || !g_ascii_strcasecmp(v, "off") ||
                 !strcmp(v, "0"))
                *ret = false;
        else
                return false;
        return true;
}

void plan_settings_defaults(const char *name, PlanSettings *s) {
        *s = (PlanSettings){ .schedule = strdup("daily"), .level = LEVEL_AUTO, .full_every = 7, .prune = true,
                             .bitmap = g_strdup_printf("diskchain-plan-%s", name) };
}

/* The plan file TEXT into S (defaults first); an error says what is wrong. */
int plan_settings_parse(Manager *mgr, const char *name, const char *text, PlanSettings *s, char **ret_error) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GError) err = NULL;
        g_auto(GStrv) groups = NULL, keys = NULL;
        static const char *const plan_keys[] = { "Chain", "Destination", "Schedule", "RandomizedDelaySec", "Level",
                                                 "FullEvery", "Compress", "Mode", "Bitmap", "Speed", "PruneAfterRun",
                                                 NULL };
        bool bad = false;
        char *v;

        *ret_error = NULL;
        plan_settings_defaults(name, s);
        if (!g_key_file_load_from_data(kf, text, (gsize) -1, G_KEY_FILE_NONE, &err)) {
                *ret_error = g_strdup_printf("plan '%s': %s", name, err->message);
                return -EINVAL;
        }
        groups = g_key_file_get_groups(kf, NULL);
        for (char **g = groups; *g; g++) {
                const char *const *allowed = strcmp(*g, "Plan") == 0        ? plan_keys
                                             : strcmp(*g, "Retention") == 0 ? plan_keep_keys
                                                                            : NULL;
                if (!allowed) {
                        *ret_error = g_strdup_printf("plan '%s': unknown section [%s]", name, *g);
                        return -EINVAL;
                }
                keys = g_key_file_get_keys(kf, *g, NULL, NULL);
                for (char **k = keys; k && *k; k++)
                        if (!g_strv_contains(allowed, *k)) {
                                *ret_error = g_strdup_printf("plan '%s': unknown key %s= in [%s]", name, *k, *g);
                                return -EINVAL;
                        }
                g_strfreev(g_steal_pointer(&keys));
        }
        if ((v = g_key_file_get_string(kf, "Plan", "Chain", NULL))) {
                s->chain = strdup(g_strstrip(v));
                g_free(v);
        }
        if ((v = g_key_file_get_string(kf, "Plan", "Destination", NULL))) {
                g_strstrip(v);
                s->destination = v[0] == '/' && !dc_nbd_uri_is(v) ? g_canonicalize_filename(v, "/") : strdup(v);
                g_free(v);
        }
        if ((v = g_key_file_get_string(kf, "Plan", "Schedule", NULL))) {
                free(s->schedule);
                s->schedule = strdup(g_strstrip(v));
                g_free(v);
        }
        if ((v = g_key_file_get_string(kf, "Plan", "Level", NULL))) {
                s->level = plan_level_from(g_strstrip(v));
                g_free(v);
        }
        if ((v = g_key_file_get_string(kf, "Plan", "Mode", NULL))) {
                bool ok = strcmp(g_strstrip(v), "push") == 0 || strcmp(v, "pull") == 0;
                s->pull = strcmp(v, "pull") == 0;
                if (!ok)
                        *ret_error = g_strdup_printf("plan '%s': Mode=%s: push or pull", name, v);
                g_free(v);
                if (!ok)
                        return -EINVAL;
        }
        if ((v = g_key_file_get_string(kf, "Plan", "Bitmap", NULL))) {
                free(s->bitmap);
                s->bitmap = strdup(g_strstrip(v));
                g_free(v);
        }
        for (int i = 0; i < 2; i++) {
                const char *key = i ? "PruneAfterRun" : "Compress";
                bool *dst = i ? &s->prune : &s->compress;
                if ((v = g_key_file_get_string(kf, "Plan", key, NULL))) {
                        bool ok = parse_bool(g_strstrip(v), dst);
                        g_free(v);
                        if (!ok) {
                                *ret_error = g_strdup_printf("plan '%s': %s= must be yes or no", name, key);
                                return -EINVAL;
                        }
                }
        }
        s->full_every = kf_uint(kf, "Plan", "FullEvery", s->full_every, &bad);
        s->randomized_delay = kf_uint(kf, "Plan", "RandomizedDelaySec", 0, &bad);
        s->speed = kf_uint(kf, "Plan", "Speed", 0, &bad);
        for (int i = 0; i < KEEP_N; i++)
                s->keep[i] = kf_uint(kf, "Retention", plan_keep_keys[i], 0, &bad);
        if (bad) {
                *ret_error = g_strdup_printf("plan '%s': a number is not a number (or too large)", name);
                return -EINVAL;
        }
        if (s->chain && s->chain[0] != '/') {
                _cleanup_free_ char *abs = NULL;
                if (dc_path_resolve(s->chain, (const char *const *) mgr->config.roots, &abs, NULL) >= 0) {
                        free(s->chain);
                        s->chain = TAKE_PTR(abs);
                }
                dc_error_clear();
        }
        return plan_settings_check(mgr, name, s, ret_error);
}

/* S as a plan file. */
char *plan_settings_format(const char *name, const PlanSettings *s) {
        GString *t = g_string_new(NULL);

        g_string_append_printf(t, "# diskchain backup plan '%s' (diskchain.plan(5)); written by diskchaind\n[Plan]\n",
                               name);
        g_string_append_printf(t, "Chain=%s\nDestination=%s\nSchedule=%s\n", s->chain, s->destination, s->schedule);
        if (s->randomized_delay)
                g_string_append_printf(t, "RandomizedDelaySec=%u\n", s->randomized_delay);
        g_string_append_printf(t, "Level=%s\nFullEvery=%u\nCompress=%s\nMode=%s\nBitmap=%s\nPruneAfterRun=%s\n",
                               plan_level_name(s->level), s->full_every, s->compress ? "yes" : "no",
                               s->pull ? "pull" : "push", s->bitmap, s->prune ? "yes" : "no");
        if (s->speed)
                g_string_append_printf(t, "Speed=%" PRIu64 "\n", s->speed);
        g_string_append(t, "\n[Retention]\n");
        for (int i = 0; i < KEEP_N; i++)
                if (s->keep[i])
                        g_string_append_printf(t, "%s=%u\n", plan_keep_keys[i], s->keep[i]);
        return g_string_free(t, FALSE);
}

/* --- the catalog ------------------------------------------------------------------------------------ */

/* The catalog from TEXT, its file's contents (NULL: none yet). */
static void catalog_load(Plan *p, const char *text) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_auto(GStrv) groups = NULL;

        if (!text || !g_key_file_load_from_data(kf, text, (gsize) -1, G_KEY_FILE_NONE, NULL))
                return;
        p->last_run = g_key_file_get_uint64(kf, "Plan", "LastRun", NULL);
        p->last_result = g_key_file_get_string(kf, "Plan", "LastResult", NULL);
        p->pending = g_key_file_get_string(kf, "Plan", "Pending", NULL);
        if (p->pending && !*p->pending)
                p->pending = (g_free(p->pending), NULL);
        p->runs_since_full = (unsigned) g_key_file_get_uint64(kf, "Plan", "RunsSinceFull", NULL);
        groups = g_key_file_get_groups(kf, NULL);
        for (char **g = groups; *g; g++) {
                g_autofree char *level = NULL, *state = NULL;
                Point *x;

                if (!g_str_has_prefix(*g, "Point "))
                        continue;
                x = calloc(1, sizeof *x);
                x->id = strdup(*g + 6);
                x->time = g_key_file_get_uint64(kf, *g, "Time", NULL);
                level = g_key_file_get_string(kf, *g, "Level", NULL);
                x->level = level ? plan_level_from(level) : LEVEL_FULL;
                x->file = g_key_file_get_string(kf, *g, "File", NULL);
                x->base = g_key_file_get_string(kf, *g, "Base", NULL);
                if (x->base && !*x->base)
                        x->base = (g_free(x->base), NULL);
                x->size = g_key_file_get_uint64(kf, *g, "Size", NULL);
                x->bytes = g_key_file_get_uint64(kf, *g, "Bytes", NULL);
                x->sums = g_key_file_get_string(kf, *g, "Checksums", NULL);
                state = g_key_file_get_string(kf, *g, "State", NULL);
                x->state = POINT_UNVERIFIED;
                for (int i = 0; state && state_names[i]; i++)
                        if (strcmp(state, state_names[i]) == 0)
                                x->state = i;
                x->error = g_key_file_get_string(kf, *g, "Damage", NULL);
                if (!x->file || x->level < 0 || x->level == LEVEL_AUTO) {
                        point_free(x);
                        continue;
                }
                g_ptr_array_add(p->points, x);
        }
}

static gint point_cmp(gconstpointer a, gconstpointer b) {
        const Point *x = *(Point *const *) a, *y = *(Point *const *) b;
        return x->time < y->time ? -1 : x->time > y->time ? 1 : strcmp(x->id, y->id);
}

/* The catalog as its file holds it. */
static char *catalog_text(Plan *p, gsize *len) {
        g_autoptr(GKeyFile) kf = g_key_file_new();

        g_ptr_array_sort(p->points, point_cmp);
        g_key_file_set_uint64(kf, "Plan", "LastRun", p->last_run);
        g_key_file_set_string(kf, "Plan", "LastResult", p->last_result ? p->last_result : "");
        g_key_file_set_string(kf, "Plan", "Pending", p->pending ? p->pending : "");
        g_key_file_set_uint64(kf, "Plan", "RunsSinceFull", p->runs_since_full);
        for (guint i = 0; i < p->points->len; i++) {
                Point *x = p->points->pdata[i];
                g_autofree char *g = g_strdup_printf("Point %s", x->id);
                g_key_file_set_uint64(kf, g, "Time", x->time);
                g_key_file_set_string(kf, g, "Level", plan_level_name(x->level));
                g_key_file_set_string(kf, g, "File", x->file);
                g_key_file_set_string(kf, g, "Base", x->base ? x->base : "");
                g_key_file_set_uint64(kf, g, "Size", x->size);
                g_key_file_set_uint64(kf, g, "Bytes", x->bytes);
                g_key_file_set_string(kf, g, "Checksums", x->sums ? x->sums : "");
                g_key_file_set_string(kf, g, "State", plan_state_name(x->state));
                if (x->error)
                        g_key_file_set_string(kf, g, "Damage", x->error);
        }
        return g_key_file_to_data(kf, len, NULL);
}

/* The generation last written of each catalog file (a plan may be gone by the time its write runs). */
static GMutex catalog_lock;
static GHashTable *catalog_gens; /* path -> uint64 */

typedef struct CatalogWrite {
        char *path, *text, *name;
        gsize len;
        uint64_t gen;
} CatalogWrite;

static void catalog_write_free(void *d) {
        CatalogWrite *c = d;
        g_free(c->path);
        g_free(c->text);
        g_free(c->name);
        free(c);
}

/* Durably: a new file renamed over the old one; an older text never over a newer one. */
static void catalog_write(CatalogWrite *c) {
        g_autoptr(GError) err = NULL;

        g_mutex_lock(&catalog_lock);
        if (!catalog_gens)
                catalog_gens = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        uint64_t *last = g_hash_table_lookup(catalog_gens, c->path);
        if (!last || c->gen > *last) {
                if (g_file_set_contents_full(c->path, c->text, (gssize) c->len,
                                             G_FILE_SET_CONTENTS_CONSISTENT | G_FILE_SET_CONTENTS_DURABLE, 0600, &err))
                        g_hash_table_insert(catalog_gens, g_strdup(c->path), g_memdup2(&c->gen, sizeof c->gen));
                else
                        log_fields(LOG_ERR, (const char *const[]){ "DISKCHAIN_PLAN", c->name, NULL },
                                   "plan '%s': cannot write its catalog: %s", c->name, err->message);
        }
        g_mutex_unlock(&catalog_lock);
}

static void catalog_write_run(Work *w) {
        catalog_write(w->data);
}

static CatalogWrite *catalog_write_new(Plan *p) {
        CatalogWrite *c = calloc(1, sizeof *c);
        static uint64_t gen; /* the loop's */

        c->path = g_strdup(p->catalog);
        c->name = g_strdup(p->name);
        c->text = catalog_text(p, &c->len);
        c->gen = ++gen;
        return c;
}

/* The catalog as it is now, written on a worker (in order with the other writes). */
void plan_catalog_save_async(Plan *p) {
        (void) work_start(p->mgr, NULL, catalog_write_run, NULL, catalog_write_new(p), catalog_write_free);
}

/* Taken on the loop, written by the caller's worker with plan_catalog_write (then freed). */
void *plan_catalog_snapshot(Plan *p) {
        return catalog_write_new(p);
}

void plan_catalog_snapshot_free(void *snapshot) {
        if (snapshot)
                catalog_write_free(snapshot);
}

void plan_catalog_write(void *snapshot) {
        if (snapshot) {
                catalog_write(snapshot);
                catalog_write_free(snapshot);
        }
}

/* --- checksums (on workers) --------------------------------------------------------------------------- */

/* The SHA-256 of every CHUNK of the file at ABS (inside ROOTS), hex, comma-separated; *RET_SIZE its size. */
/* A replica's checksums: the export URI's contents, read back over NBD (O: TLS as the daemon's jobs use it). */
static int remote_sums(const char *uri, const struct dc_nbd_client_options *o, char **ret, uint64_t *ret_size) {
        dc_image *img = NULL;
        GString *out;
        uint8_t *buf;
        uint64_t off = 0, size;
        int r = dc_image_open_nbd(uri, false, o, &img);

        if (r < 0)
                return r;
        size = dc_image_virtual_size(img);
        buf = malloc(4 << 20);
        out = g_string_new(NULL);
        r = buf ? 0 : dc_set_error(ENOMEM, "out of memory");
        while (r >= 0 && off < size) {
                GChecksum *c = g_checksum_new(G_CHECKSUM_SHA256);
                uint64_t end = MIN(off + CHUNK, size);
                while (r >= 0 && off < end) {
                        size_t n = (size_t) MIN(end - off, (uint64_t) 4 << 20);
                        r = dc_image_read(img, buf, off, n);
                        if (r >= 0) {
                                g_checksum_update(c, buf, (gssize) n);
                                off += n;
                        }
                }
                g_string_append_printf(out, "%s%s", out->len ? "," : "", g_checksum_get_string(c));
                g_checksum_free(c);
        }
        free(buf);
        dc_image_close(img);
        if (r < 0) {
                g_string_free(out, TRUE);
                return r;
        }
        *ret = g_string_free(out, FALSE);
        *ret_size = size;
        return 0;
}

int plan_sums(const char *file, char **roots, const struct dc_nbd_client_options *o, char **ret, uint64_t *ret_size) {
        if (dc_nbd_uri_is(file))
                return remote_sums(file, o, ret, ret_size);
        return plan_file_sums(file, roots, ret, ret_size);
}

int plan_file_sums(const char *abs, char **roots, char **ret, uint64_t *ret_size) {
        int fd = dc_path_open(abs, (const char *const *) roots, O_RDONLY | O_CLOEXEC, 0);
        GString *out;
        uint8_t *buf;
        struct stat st;
        uint64_t off = 0;

        if (fd < 0)
                return fd;
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                close(fd);
                return dc_set_error(EINVAL, "'%s' is not a regular file", abs);
        }
        buf = malloc(1 << 20);
        out = g_string_new(NULL);
        while (buf && off < (uint64_t) st.st_size) {
                GChecksum *c = g_checksum_new(G_CHECKSUM_SHA256);
                uint64_t end = MIN(off + CHUNK, (uint64_t) st.st_size);
                while (off < end) {
                        ssize_t n = pread(fd, buf, (size_t) MIN(end - off, (uint64_t) 1 << 20), (off_t) off);
                        if (n <= 0) {
                                int e = n < 0 ? errno : EIO;
                                g_checksum_free(c);
                                g_string_free(out, TRUE);
                                free(buf);
                                close(fd);
                                return dc_set_error(e, "'%s': read error at %" PRIu64 ": %s", abs, off, strerror(e));
                        }
                        g_checksum_update(c, buf, (gssize) n);
                        off += (uint64_t) n;
                }
                g_string_append_printf(out, "%s%s", out->len ? "," : "", g_checksum_get_string(c));
                g_checksum_free(c);
        }
        free(buf);
        close(fd);
        *ret = g_string_free(out, FALSE);
        *ret_size = (uint64_t) st.st_size;
        return 0;
}

/* Where the checksums SUMS and NOW differ: "" when they agree, else a description (g_free()). */
char *plan_sums_differ(const char *sums, const char *now, uint64_t size_then, uint64_t size_now) {
        g_auto(GStrv) a = g_strsplit(sums ? sums : "", ",", -1), b = g_strsplit(now ? now : "", ",", -1);
        GString *d = g_string_new(NULL);
        guint na = g_strv_length(a), nb = g_strv_length(b);

        if (size_then != size_now)
                g_string_append_printf(d, "its size is %" PRIu64 " bytes, not the %" PRIu64 " it had", size_now,
                                       size_then);
        for (guint i = 0; i < MAX(na, nb); i++)
                if (i >= na || i >= nb || strcmp(a[i], b[i]) != 0) {
                        uint64_t from = i * CHUNK, to = MIN((i + 1) * CHUNK, MAX(size_then, size_now));
                        g_string_append_printf(d, "%sbytes %" PRIu64 "..%" PRIu64 " changed", d->len ? "; " : "", from,
                                               to);
                }
        return g_string_free(d, FALSE);
}

/* --- retention (restic's policy) --------------------------------------------------------------------- */

/* The period of T (µs) for rule K, in local time: distinct values are distinct periods. */
static int64_t period(int k, uint64_t t, int64_t nr) {
        time_t s = (time_t) (t / 1000000);
        struct tm tm;
        char b[16];

        localtime_r(&s, &tm);
        switch (k) {
        case KEEP_LAST:
                return nr; /* every point its own */
        case KEEP_HOURLY:
                return ((int64_t) tm.tm_year * 1000 + tm.tm_yday) * 100 + tm.tm_hour;
        case KEEP_DAILY:
                return (int64_t) tm.tm_year * 1000 + tm.tm_yday;
        case KEEP_WEEKLY:
                strftime(b, sizeof b, "%G%V", &tm); /* ISO 8601 year and week */
                return g_ascii_strtoll(b, NULL, 10);
        case KEEP_MONTHLY:
                return (int64_t) tm.tm_year * 100 + tm.tm_mon;
        default:
                return tm.tm_year;
        }
}

/*
 * Which of POINTS (oldest first) the rules KEEP keep: KEEP_OUT[i] for
 * POINTS[i], REASON_OUT[i] the rules that keep it ("daily weekly").  No
 * rule at all keeps everything; the newest point is always kept.
 */
void plan_retention(GPtrArray *points, const unsigned *keep, bool *keep_out, char **reason_out) {
        unsigned left[KEEP_N];
        int64_t last[KEEP_N];
        bool any = false;
        int n = (int) points->len;

        for (int k = 0; k < KEEP_N; k++) {
                left[k] = keep[k];
                last[k] = INT64_MIN;
                any |= keep[k] > 0;
        }
        for (int i = n - 1; i >= 0; i--) {
                const Point *x = points->pdata[i];
                GString *why = g_string_new(NULL);
                bool kept = !any;

                for (int k = 0; k < KEEP_N && any; k++) {
                        int64_t v;
                        if (!left[k])
                                continue;
                        v = period(k, x->time, n - 1 - i);
                        /* a new period; and (restic 0.16) the oldest point while a rule has periods to give */
                        if (v != last[k] || i == 0) {
                                g_string_append_printf(why, "%s%s%s", why->len ? " " : "",
                                                       v == last[k] ? "oldest-" : "",
                                                       (const char *const[]){ "last", "hourly", "daily", "weekly",
                                                                              "monthly", "yearly" }[k]);
                                kept = true;
                                last[k] = v;
                                left[k]--;
                        }
                }
                if (!any)
                        g_string_append(why, "no retention rule");
                if (i == n - 1 && !kept) {
                        kept = true;
                        g_string_append(why, "newest");
                }
                keep_out[i] = kept;
                reason_out[i] = g_string_free(why, FALSE);
        }
}

/* --- loading ------------------------------------------------------------------------------------------ */

static char *plan_object_path(const char *name) {
        char *o = NULL;
        (void) sd_bus_path_encode(PLAN_PREFIX, name, &o);
        return o;
}

char *plan_catalog_path(Manager *mgr, const char *name) {
        return g_strdup_printf("%s/plans/%s.catalog", mgr->config.state_dir, name);
}

Plan *plan_new(Manager *mgr, const char *name, PlanSettings *set, const char *catalog_text) {
        Plan *p = calloc(1, sizeof *p);

        p->mgr = mgr;
        p->name = strdup(name);
        p->object = plan_object_path(name);
        p->file = g_strdup_printf("%s/%s.conf", mgr->config.plans_dir, name);
        p->catalog = plan_catalog_path(mgr, name);
        p->set = *set;
        *set = (PlanSettings){ 0 };
        p->points = g_ptr_array_new_with_free_func(point_free);
        catalog_load(p, catalog_text);
        g_ptr_array_sort(p->points, point_cmp);
        /* a run that did not get to its end: what the bitmap held may be lost with it */
        p->force_full = p->pending != NULL;
        return p;
}

/* Every PLANS_DIR/NAME.conf; a plan that does not parse is logged and left out. */
void plans_load(Manager *mgr) {
        g_autoptr(GDir) d = NULL;
        g_autofree char *cat = g_strdup_printf("%s/plans", mgr->config.state_dir);
        const char *e;

        (void) g_mkdir_with_parents(cat, 0700);
        if (getenv("DISKCHAIN_TEST_CLOCK_FILE"))
                log_warning("the plans' clock is DISKCHAIN_TEST_CLOCK_FILE's (%s): for tests only",
                            getenv("DISKCHAIN_TEST_CLOCK_FILE"));
        d = g_dir_open(mgr->config.plans_dir, 0, NULL);
        while (d && (e = g_dir_read_name(d))) {
                g_autofree char *name = NULL, *path = NULL, *text = NULL, *err = NULL;
                PlanSettings set = { 0 };

                if (!g_str_has_suffix(e, ".conf"))
                        continue;
                name = g_strndup(e, strlen(e) - 5);
                if (!plan_name_valid(name)) {
                        log_warning("plans: '%s' is no valid plan name (1..64 of A-Z a-z 0-9 . _ -): ignored", e);
                        continue;
                }
                path = g_strdup_printf("%s/%s", mgr->config.plans_dir, e);
                if (!g_file_get_contents(path, &text, NULL, NULL) ||
                    plan_settings_parse(mgr, name, text, &set, &err) < 0) {
                        log_fields(LOG_WARNING, (const char *const[]){ "DISKCHAIN_PLAN", name, NULL },
                                   "plan '%s' (%s) is not loaded: %s", name, path, err ? err : "cannot read it");
                        plan_settings_clear(&set);
                        continue;
                }
                g_autofree char *cpath = plan_catalog_path(mgr, name), *ctext = NULL;
                Plan *p;
                /* (at start, before the loop serves anyone) */
                (void) g_file_get_contents(cpath, &ctext, NULL, NULL);
                p = plan_new(mgr, name, &set, ctext);
                g_hash_table_insert(mgr->plans, strdup(name), p);
                plan_next_run_refresh(p);
        }
}

char **model_plan_paths(Manager *mgr) {
        GPtrArray *a = g_ptr_array_new();
        GHashTableIter it;
        Plan *p;

        g_hash_table_iter_init(&it, mgr->plans);
        while (g_hash_table_iter_next(&it, NULL, (void **) &p))
                g_ptr_array_add(a, g_strdup(p->object));
        g_ptr_array_sort(a, (GCompareFunc) g_strcmp0);
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

bool plans_busy(Manager *mgr) {
        GHashTableIter it;
        Plan *p;

        if (!mgr->plans)
                return false;
        g_hash_table_iter_init(&it, mgr->plans);
        while (g_hash_table_iter_next(&it, NULL, (void **) &p))
                if (p->running || p->busy)
                        return true;
        return false;
}
