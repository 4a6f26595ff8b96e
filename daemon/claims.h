/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * claims.c — who may use which image: the images a job claimed busy, the
 * targets of jobs, and the images our own work has open read-write.  The
 * one owner of those tables; depends on glib only.  All on the loop thread.
 */

#include <glib.h>
#include <stdbool.h>

typedef struct Claims Claims;

Claims *claims_new(void);
/* Accepts NULL; returns NULL. */
Claims *claims_free(Claims *c);

/*
 * Claim PATHS (NULL-terminated) busy for job ID, and TARGET (NULL: none) as
 * its target, all or nothing; the job writes through the export VIA (NULL:
 * none), whose images it may use.  -EBUSY when a path is some job's
 * path or target already or another export's, or TARGET is some job's
 * target or path, or exported;
 * then *RET_MESSAGE (g_free() it) says which, in the words of the D-Bus
 * error Busy, and nothing was taken.
 */
int claims_take(Claims *c, const char *id, char *const *paths, const char *target, const char *via,
                char **ret_message);
/*
 * Give back what job ID claimed: PATHS and TARGET, each only where ID is
 * the holder.  Returns true when TARGET's place was given back.
 */
bool claims_release(Claims *c, const char *id, char *const *paths, const char *target);
/* The job that claimed PATH busy, or NULL. */
const char *claims_holder(Claims *c, const char *path);
/* The job whose target PATH is, or NULL. */
const char *claims_target_of(Claims *c, const char *path);

/* Our own work opens PATHS read-write (DELTA +1) or closed them again (-1); counted. */
void claims_hold(Claims *c, char *const *paths, int delta);
/* Held by our work, or exported (the QEMU lock is ours either way). */
bool claims_held(Claims *c, const char *path);

/*
 * The NBD export NAME serves PATHS: all or nothing; -EBUSY (with
 * *RET_MESSAGE) when one is a job's, a job's target, or another export's.
 */
int claims_export(Claims *c, const char *name, char *const *paths, char **ret_message);
/* Give back what export NAME claimed of PATHS. */
void claims_unexport(Claims *c, const char *name, char *const *paths);
/*
 * Export NAME's chain changed under it (a job through its write path
 * pivoted, or a snapshot): it serves NEW_PATHS instead of OLD_PATHS now,
 * whatever else claims them (the job that moved it still does).
 */
void claims_export_move(Claims *c, const char *name, char *const *old_paths, char *const *new_paths);
/* The export serving PATH, or NULL. */
const char *claims_exporter(Claims *c, const char *path);
