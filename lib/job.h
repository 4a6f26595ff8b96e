/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * Inside the block jobs: the job model (job.c) and what a job type's
 * driver gives it (QEMU's JobDriver / BlockJobDriver), the chain helpers
 * the drivers share (job-chain.c), and the drivers' constructors.
 *
 * A driver's state struct starts with a dc_job (allocated by
 * dc_job_new() with the driver's instance_size) and is found again with
 * container_of().  The model calls the operations below; it never looks
 * at the job's type.
 */

#include "block-copy.h"
#include "dc-internal.h"

struct dc_job_driver {
        int type;              /* DC_JOB_TYPE_*: what dc_job_type() says, nothing else */
        size_t instance_size;  /* the driver's state struct, which starts with its dc_job */
        /* The work, on the job's thread.  < 0 fails the job (or ends a hard cancel). */
        int (*run)(dc_job *j);
        /* After the work succeeded and the job was finalized: the graph change.  May fail. */
        int (*prepare)(dc_job *j);
        /* After prepare succeeded, or after the work or prepare failed or the job was cancelled. */
        void (*commit)(dc_job *j);
        void (*abort)(dc_job *j);
        /* Always, last (also for a job that never started): unhook, release what the job holds. */
        void (*clean)(dc_job *j);
        /* The verbs a type may give meaning to, called under the job's lock after the verb
         * table allowed them.  complete and change NULL: the type refuses them. */
        int (*complete)(dc_job *j); /* < 0 refuses it (with dc_error's reason) */
        /* cancel: is this cancel a hard one?  NULL: every cancel is (QEMU's default). */
        bool (*cancel)(dc_job *j, bool force);
        int (*change)(dc_job *j, int copy_mode);
        /* Type-specific parts of dc_job_get_info(), under the job's lock. */
        void (*query)(dc_job *j, struct dc_job_info *ret);
};

struct event_node;

/* The model's part of every job.  Fields under `lock` unless said otherwise. */
struct dc_job {
        const struct dc_job_driver *drv;
        pthread_mutex_t lock;
        pthread_cond_t cond;       /* verbs, writes a waiting job cares about */
        pthread_mutex_t rate_gate; /* under a speed limit, one request at a time (dc_job_turn_take) */
        pthread_t thread;
        bool thread_started;
        char *id;
        int status;
        uint64_t len, offset, speed;
        uint64_t copied;        /* data copied (the rate limit's count, never reset) */
        bool user_paused, paused_now, cancelled, force_cancel, finalize_requested;
        bool auto_finalize, auto_dismiss, busy;
        int on_error, on_error_write, io_status;
        int cache;                 /* DC_CACHE_*: for the layer the job writes (set at creation) */
        char error[512];
        struct event_node *head, *tail;
        void (*notify)(void *);
        int (*pivoted)(void *, const char *, const char *const *);
        void *userdata;
        uint64_t rate_start_ns, rate_bytes;

        /* the chain the job works on (job-chain.c), set at creation */
        dc_disk *disk;             /* the chain's write path (a reference) */
        bool disk_reopened;        /* the caller's disk was reopened with layers read-write */
};

/* --- the model (job.c) --- */

/* The transition and verb tables (QEMU's JobSTT and JobVerbTable). */
enum { DC_VERB_CANCEL, DC_VERB_PAUSE, DC_VERB_RESUME, DC_VERB_SET_SPEED, DC_VERB_COMPLETE, DC_VERB_FINALIZE,
       DC_VERB_DISMISS, DC_VERB_CHANGE, DC_VERB_COUNT };
bool dc_job_transition_allowed(int from, int to);
bool dc_job_verb_allowed(int verb, int status);

/* A job of DRV with a well-formed id (QMP's rule) and JO's options, not started.  Free with dc_job_free(). */
int dc_job_new(const struct dc_job_driver *drv, const struct dc_job_options *jo, dc_job **ret);
/* Start the job's thread (created -> running): the caller's *RET from then on.  On failure J is freed. */
int dc_job_start(dc_job *j, dc_job **ret);
static inline void dc_job_freep(dc_job **j) {
        dc_job_free(*j);
}

/* Change the status (the job lock held); asserts the transition table, queues the event. */
void dc_job_set_status(dc_job *j, int status);
/* Queue a READY, PENDING, COMPLETED or CANCELLED event with the progress (the job lock held). */
void dc_job_event(dc_job *j, int kind, const char *error);
/* Tell the owner that events are queued (no lock held). */
void dc_job_wake(dc_job *j);

/*
 * Between requests: account progress (DONE) and the data moved for the
 * speed limit (COPIED), take a requested pause (reporting paused/standby
 * only now, as QEMU does), honour the speed limit.  -ECANCELED when hard
 * cancelled.  Called without the lock.
 */
int dc_job_pause_point(dc_job *j, uint64_t done, uint64_t copied);
/* An I/O error under the job's on-error policy: 0 retry (after a stop and resume), 1 skip (ignore), or the error. */
int dc_job_io_error(dc_job *j, int err, bool is_read);
/* The job's turn under a speed limit (returns whether taken), given back after the request's pause point. */
bool dc_job_turn_take(dc_job *j);
void dc_job_turn_give(dc_job *j, bool taken);
/* The copy engine's hooks for a job (opaque: the dc_job). */
extern const struct dc_block_copy_hooks dc_job_copy_hooks;
/* The job's copy engine: P with the job's disk, cache mode and (unless P has its own) dc_job_copy_hooks. */
int dc_job_copy_new(dc_job *j, struct dc_block_copy_params p, dc_block_copy **ret);
/* The work of a one-pass copy job (stream, commit, backup): a pass, the target flushed, and a failure
 * if on-error=ignore skipped something. */
int dc_job_copy_run(dc_job *j, dc_block_copy *bc);

/* --- the chain a job works on (job-chain.c) --- */

extern const struct dc_open_options dc_job_no_options;
/* Resolve PATH to an absolute path inside the roots; free() it. */
int dc_job_path(const char *path, const struct dc_open_options *oo, char **ret);
/* The layer of CHAIN whose path is ABS, or NULL. */
dc_image *dc_job_find_layer(dc_image *chain, const char *abs);
/* The name of BASE as seen from the directory of IMG (relative when below it); free() it. */
char *dc_job_backing_name(dc_image *img, dc_image *base);
/* -EROFS with the reason unless L is open read-write. */
int dc_job_writable_check(dc_image *l);
/*
 * Give J its chain (j->disk) with TOP_ABS in it and the layers in
 * WRITABLE (NULL-terminated absolute paths) read-write: the caller's
 * jo->disk (reopened when one of them is read-only in it), or a disk of
 * the job's own.  Checks it against jo->expect_chain.
 */
int dc_job_open_chain(dc_job *j, const char *top_abs, const struct dc_open_options *oo,
                      const struct dc_job_options *jo, const char *const *writable);
/* Put the caller's disk back as it was (its layers read-only again), if the job reopened it. */
void dc_job_restore_chain(dc_job *j);
/*
 * A backup or mirror of DRV: SOURCE_PATH and TARGET_PATH resolved and
 * different (else EINVAL with SAME, QMP's message), the job with the
 * source's chain, *RET_SOURCE the layer SOURCE_PATH in it, and
 * *RET_TARGET the target opened alone (its top only, read-write), which
 * the caller owns from now on.
 */
int dc_job_new_copy(const struct dc_job_driver *drv, const char *source_path, bool source_writable, const char *target_path,
                    const struct dc_open_options *oo, const struct dc_job_options *jo, const char *same,
                    dc_job **ret, dc_image **ret_source, dc_image **ret_target);

/* Mark in BC what sync mode SYNC copies of SOURCE's chain: its allocation (full), its top layer's (top),
 * nothing (none). */
int dc_job_mark_sync(dc_block_copy *bc, dc_image *source, int sync);
/* BASE_ABS below TOP in the chain, writable: *RET; else the error naming BASE_PATH and TOP_PATH. */
int dc_job_find_base(dc_image *top, const char *base_abs, const char *base_path, const char *top_path, dc_image **ret);

/* A commit's bitmaps: those of TOP and the layers below it down to BASE merged into BASE's. */
int dc_job_commit_bitmaps(dc_image *top, dc_image *base);

/* What a stream or commit records at its end: LAYER's new backing file, BASE. */
struct dc_job_rebase {
        dc_image *layer;
        char *backing, *backing_fmt;
};
/* BACKING_FILE as given, or BASE's name relative to LAYER's directory, and BASE's format; BASE NULL: none. */
int dc_job_rebase_init(struct dc_job_rebase *rb, dc_image *layer, dc_image *base, const char *backing_file);
/* Record it (a driver's prepare). */
int dc_job_rebase_apply(struct dc_job_rebase *rb);
void dc_job_rebase_release(struct dc_job_rebase *rb);

/* Stream and commit: the engine's one pass, then a new backing file recorded.  Their state starts with it. */
struct dc_rebase_job {
        dc_job job;
        dc_block_copy *copy;
        struct dc_job_rebase rebase;
};
int dc_rebase_job_run(dc_job *j);       /* the pass (dc_job_copy_run) */
int dc_rebase_job_prepare(dc_job *j);   /* the record */
void dc_rebase_job_clean(dc_job *j);

/* --- drivers (job-*.c) --- */

/* Active commit: a mirror into base (job-mirror.c); paths resolved, TOP the active layer. */
int dc_job_commit_active(const char *top, const char *base, const char *top_path, const char *base_path,
                         const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret);
