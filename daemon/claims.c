/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The claims on images: the one place that says which job uses an image,
 * which image is a job's target, and which images our own work has open
 * read-write.
 *
 * Design notes
 * ------------
 * - A job claims every image it reads or writes (busy: path -> job id)
 *   and, when it writes a file outside the chain, that target
 *   (targets: path -> job id).  A claim is taken at once for all paths and
 *   the target, on the loop, between the call's checks and its work's
 *   queue, so no second call can slip in between; it is all or nothing,
 *   and the first conflict found is what the caller is told.
 * - An image is busy for one job at most: claims_take refuses a path that
 *   is any job's already.  Release gives back only what the job itself
 *   holds, so releasing twice, or for a job that never got the claim, is
 *   harmless.
 * - Holds count (path -> count): several operations may have one image
 *   open read-write at once; while any does, the image's QEMU write lock
 *   is ours, not another process's (InUse "external" ignores it).
 * - An NBD export claims its chain's images (exported: path -> export
 *   name) for as long as it serves them.  A job may use exported images
 *   only through that export's write path (claims_take's VIA), never
 *   another export's images, and never writes one as its target; an image
 *   is exported by one export at most, and not while a job holds it (the
 *   job opened its own chain, which the export cannot share).  Exported
 *   images count as held: their QEMU lock is ours.
 * - Announcing what a change means (InUse, set-aside images, a rescan) is
 *   the model's business (model.c, job.c): this file only keeps the facts.
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "claims.h"

struct Claims {
        GHashTable *busy;    /* image path -> job id, for images a job uses */
        GHashTable *targets; /* image path -> job id, for the targets of running jobs */
        GHashTable *held;    /* path -> count: images our own work has open read-write */
        GHashTable *exported; /* image path -> export name, for the images an NBD export serves */
};

Claims *claims_new(void) {
        Claims *c = g_new0(Claims, 1);

        c->busy = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        c->targets = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        c->held = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        c->exported = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        return c;
}

Claims *claims_free(Claims *c) {
        if (!c)
                return NULL;
        g_hash_table_destroy(c->busy);
        g_hash_table_destroy(c->targets);
        g_hash_table_destroy(c->held);
        g_hash_table_destroy(c->exported);
        g_free(c);
        return NULL;
}

int claims_take(Claims *c, const char *id, char *const *paths, const char *target, const char *via,
                char **ret_message) {
        const char *holder;

        for (char *const *p = paths; p && *p; p++) {
                holder = claims_holder(c, *p);
                if (holder) {
                        *ret_message = g_strdup_printf("'%s' is in use by job '%s'", *p, holder);
                        return -EBUSY;
                }
                /* (an NBD export another job writes: the model knows no such image to refuse it earlier) */
                holder = claims_target_of(c, *p);
                if (holder) {
                        *ret_message = g_strdup_printf("'%s' is the target of job '%s'", *p, holder);
                        return -EBUSY;
                }
                holder = claims_exporter(c, *p);
                if (holder && g_strcmp0(holder, via) != 0) {
                        *ret_message = g_strdup_printf("'%s' is exported over NBD as '%s'", *p, holder);
                        return -EBUSY;
                }
        }
        holder = target ? claims_target_of(c, target) : NULL;
        if (holder) {
                *ret_message = g_strdup_printf("'%s' is the target of job '%s'", target, holder);
                return -EBUSY;
        }
        /* (a file target in use is refused before, by the model; an NBD export a job reads is only here) */
        holder = target ? claims_holder(c, target) : NULL;
        if (holder) {
                *ret_message = g_strdup_printf("'%s' is in use by job '%s'", target, holder);
                return -EBUSY;
        }
        holder = target ? claims_exporter(c, target) : NULL;
        if (holder) {
                *ret_message = g_strdup_printf("'%s' is exported over NBD as '%s'", target, holder);
                return -EBUSY;
        }
        for (char *const *p = paths; p && *p; p++)
                g_hash_table_replace(c->busy, g_strdup(*p), g_strdup(id));
        if (target)
                g_hash_table_replace(c->targets, g_strdup(target), g_strdup(id));
        return 0;
}

static bool release_one(GHashTable *t, const char *id, const char *path) {
        if (g_strcmp0(g_hash_table_lookup(t, path), id) != 0)
                return false;
        return g_hash_table_remove(t, path);
}

bool claims_release(Claims *c, const char *id, char *const *paths, const char *target) {
        for (char *const *p = paths; p && *p; p++)
                (void) release_one(c->busy, id, *p);
        return target && release_one(c->targets, id, target);
}

const char *claims_holder(Claims *c, const char *path) {
        return g_hash_table_lookup(c->busy, path);
}

const char *claims_target_of(Claims *c, const char *path) {
        return g_hash_table_lookup(c->targets, path);
}

void claims_hold(Claims *c, char *const *paths, int delta) {
        for (char *const *p = paths; p && *p; p++) {
                unsigned n = GPOINTER_TO_UINT(g_hash_table_lookup(c->held, *p));
                if (delta > 0)
                        g_hash_table_replace(c->held, g_strdup(*p), GUINT_TO_POINTER(n + 1));
                else if (n <= 1)
                        g_hash_table_remove(c->held, *p);
                else
                        g_hash_table_replace(c->held, g_strdup(*p), GUINT_TO_POINTER(n - 1));
        }
}

bool claims_held(Claims *c, const char *path) {
        return g_hash_table_contains(c->held, path) || g_hash_table_contains(c->exported, path);
}

int claims_export(Claims *c, const char *name, char *const *paths, char **ret_message) {
        const char *holder;

        for (char *const *p = paths; p && *p; p++) {
                if ((holder = claims_holder(c, *p))) {
                        *ret_message = g_strdup_printf("'%s' is in use by job '%s'", *p, holder);
                        return -EBUSY;
                }
                if ((holder = claims_target_of(c, *p))) {
                        *ret_message = g_strdup_printf("'%s' is the target of job '%s'", *p, holder);
                        return -EBUSY;
                }
                if ((holder = claims_exporter(c, *p)) && strcmp(holder, name) != 0) {
                        *ret_message = g_strdup_printf("'%s' is exported over NBD as '%s' already", *p, holder);
                        return -EBUSY;
                }
        }
        for (char *const *p = paths; p && *p; p++)
                g_hash_table_replace(c->exported, g_strdup(*p), g_strdup(name));
        return 0;
}

void claims_unexport(Claims *c, const char *name, char *const *paths) {
        for (char *const *p = paths; p && *p; p++)
                (void) release_one(c->exported, name, *p);
}

void claims_export_move(Claims *c, const char *name, char *const *old_paths, char *const *new_paths) {
        claims_unexport(c, name, old_paths);
        for (char *const *p = new_paths; p && *p; p++)
                g_hash_table_replace(c->exported, g_strdup(*p), g_strdup(name));
}

const char *claims_exporter(Claims *c, const char *path) {
        return g_hash_table_lookup(c->exported, path);
}
