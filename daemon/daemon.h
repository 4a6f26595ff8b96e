/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <syslog.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "claims.h"
#include "diskchain.h"
#include "job-rate.h"
#include "names.h"
#include "pool.h"

#define BUS_NAME "org.diskchain.DiskChain1"
#define MANAGER_PATH "/org/diskchain/DiskChain1"
#define IMAGE_PREFIX MANAGER_PATH "/image"
#define CHAIN_PREFIX MANAGER_PATH "/chain"
#define JOB_PREFIX MANAGER_PATH "/job"
#define EXPORT_PREFIX MANAGER_PATH "/export"
#define PLAN_PREFIX MANAGER_PATH "/plan"
#define IFACE_MANAGER BUS_NAME ".Manager"
#define IFACE_IMAGE BUS_NAME ".Image"
#define IFACE_CHAIN BUS_NAME ".Chain"
#define IFACE_JOB BUS_NAME ".Job"
#define IFACE_EXPORT BUS_NAME ".Export"
#define IFACE_PLAN BUS_NAME ".Plan"
#define ERROR_PREFIX BUS_NAME ".Error."

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _printf_(a, b) __attribute__((format(printf, a, b)))
#define _fallthrough_ __attribute__((fallthrough))
static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)
#define TAKE_FD(fd)                       \
        ({                                \
                int _tfd_ = (fd);         \
                (fd) = -1;                \
                _tfd_;                    \
        })
#define TAKE_PTR(p)                       \
        ({                                \
                __typeof__(p) _tp_ = (p); \
                (p) = NULL;               \
                _tp_;                     \
        })

/*
 * Lock order of the daemon (the library's is in lib/dc-internal.h): the
 * event loop thread owns every structure below except the Registry (its own
 * mutex, taken by worker and job threads through the format oracle and the
 * pivot record) and the Pool's queues (its own mutex, pool.c).  Neither is
 * held while taking the other.
 */

typedef struct Manager Manager;
typedef struct Registry Registry;
typedef struct Work Work;

/* One file in the storage roots, as last read (by a worker thread). */
typedef struct Image {
        Manager *mgr;
        char *path;           /* absolute */
        char *object;         /* bus object path */
        int format;
        uint64_t virtual_size, actual_size;
        uint32_t cluster_size;
        char *compat, *compression_type, *backing_file, *backing_format;
        char *backing_abs;    /* resolved backing path, or NULL */
        char *data_file, *data_file_abs; /* external data file: as stored, and resolved (NULL: none) */
        bool dirty, corrupt, encrypted, read_only;
        char *superseded_by;  /* a pivot replaced this layer with that active layer (NULL = no) */
        dev_t dev;
        ino_t ino;
        bool external;        /* another process holds QEMU's write lock on it (last look) */
        struct dc_bitmap_info *bitmaps; /* the persistent dirty bitmaps (qcow2), as last read */
        size_t n_bitmaps;
        char *error;          /* set when the file is no usable image: not exported */
        int error_errno;
} Image;

typedef struct Config {
        char **roots;         /* NULL-terminated */
        char *state_dir;
        char *runtime_dir;    /* the NBD sockets live in its nbd/ */
        unsigned max_exports;
        unsigned max_connections; /* an export's default */
        /* [NBD] exports over TCP (export.c, diskchain.conf(5)) */
        char **tcp_listen;    /* TCPListen=: "ADDR" or "ADDR:PORT" an export may listen on; NULL: TCP is off */
        bool tcp_plaintext_loopback; /* TCPPlaintextLoopback=: loopback addresses go without TLS */
        char *tls_dir;        /* TLSCredentials=: X.509 (ca-cert.pem, server-cert.pem, server-key.pem), or NULL */
        char *tls_psk_file;   /* TLSPSKFile=: psktool keys, or NULL */
        bool tls_verify_peer; /* TLSVerifyPeer=: clients need a certificate from the CA (default yes) */
        unsigned max_jobs;
        unsigned max_depth;
        unsigned workers;     /* threads for image work */
        unsigned max_operations; /* client operations queued or running at once */
        uint64_t idle_timeout_usec;
        char *remote_tls_certificates; /* [Remote] TLSCertificates=: x509 directory for nbds targets, or NULL */
        char *remote_tls_psk_file;     /* [Remote] TLSPSKFile=, or NULL */
        char *plans_dir;      /* [Plans] Directory=: the backup plans, NAME.conf (default /etc/diskchain/plans.d) */
} Config;

struct Manager {
        sd_event *event;
        sd_bus *bus;
        Config config;
        Registry *registry;
        struct dc_format_oracle oracle;
        Claims *claims;       /* which job uses which image, what our work holds (claims.c) */

        /* the model (model.c) */
        GHashTable *images;   /* path -> Image* (including files that are no usable image) */
        GHashTable *overlays; /* backing path -> GPtrArray of Image* naming it */
        GHashTable *data_files; /* data file path -> Image* whose guest data it holds */
        GHashTable *active;   /* path -> chain object path: active layers of chains, as last announced */
        GHashTable *image_objects; /* object path -> Image* (exported images), for the object lookups */
        GHashTable *chain_objects; /* chain object path -> active path (both owned by active) */
        int inotify_fd;
        sd_event_source *inotify_source, *refresh_timer, *locks_timer;
        GMutex watch_lock;    /* the two tables below: workers add watches */
        GHashTable *watches;  /* wd -> directory path */
        GHashTable *watched;  /* directory path -> wd */
        GHashTable *dirty;    /* paths to read again */
        bool rescan_all;      /* the inotify queue overflowed: read everything again */
        bool refresh_running, locks_running;
        GPtrArray *waiters_now, *waiters_next; /* calls to dispatch again after a refresh */
        GHashTable *freshened; /* sd_bus_message* -> expiry (µs): calls already made fresh */

        /* work (work.c) */
        Pool *pool;
        uint64_t last_call;   /* CLOCK_MONOTONIC µs of the last call, for the idle exit */
        unsigned operations;  /* client operations queued or running */

        /* polkit (polkit.c) */
        GHashTable *polkit;   /* sd_bus_message* -> PolkitQuery* */
        sd_bus_slot *name_owner_slot;

        /* jobs (job.c) */
        GHashTable *jobs;     /* id -> Job* */
        GHashTable *job_ids;  /* id -> NULL: reserved from the start of a call until the job is gone */
        int job_fd;           /* eventfd: some job has events */
        sd_event_source *job_source, *progress_timer;
        unsigned job_counter;

        /* backup plans (plan.c) */
        GHashTable *plans;    /* name -> Plan* */

        /* NBD exports (export.c) */
        GHashTable *exports;  /* name -> Export* (also those starting or stopping) */
        int export_fd;        /* eventfd: some export's clients or counters changed */
        sd_event_source *export_source, *export_timer;
};

typedef struct Job {
        Manager *mgr;
        dc_job *dj;
        char *id, *object, *chain_object;
        char *top, *base, *target;
        char **paths;         /* images held busy */
        uid_t uid;
        uint64_t start_time;  /* µs since the epoch (StartTime) */
        int type, status;
        uint64_t last_offset, last_len; /* as last announced */
        JobRate rate;         /* Rate, and when the job started and ended */
        uint64_t expected_end; /* ExpectedEndTime: µs since the epoch, 0 when unknown */
        struct dc_job_info last;
        char *outcome;        /* how it ended: NULL while running, "" completed, else the error */
        bool cancelled;
        uint64_t done_bytes;
} Job;

/* An NBD export of a chain (export.c; its bus glue is bus-export.c). */
typedef enum ExportState { EXPORT_STARTING, EXPORT_LIVE, EXPORT_STOPPING } ExportState;
typedef struct Export {
        Manager *mgr;
        char *name, *object;
        char *active;         /* the chain's active layer (follows pivots and snapshots) */
        char *chain_object;   /* as last announced */
        char **paths;         /* the images claimed (claims_export) */
        char *socket;         /* the listening socket's path, or NULL (only OpenNBD connections or TCP) */
        struct stat socket_st;
        char *tcp;            /* the TCP address listened on ("ADDR:PORT", [IPv6]), or NULL */
        bool tls;             /* TCP connections must start TLS */
        bool writable, persistent;
        int cache;            /* DC_CACHE_* of the clients' reads and writes */
        char *bitmap;         /* offered as qemu:dirty-bitmap:BITMAP, as it was at the start, or NULL */
        /*
         * A point-in-time view (image fleecing): the chain is claimed like a
         * job's (CLAIM), through the live export VIA when there is one, and
         * FLEECE, the temporary fleecing image, is its target, removed at the stop.
         */
        bool snapshot, discard_after_read, break_snapshot;
        unsigned cbw_timeout_ms;
        char *claim, *via, *fleece, *checkpoint;
        dc_snapshot *view;
        bool anonymous;       /* made by OpenNBD: stops when its last client leaves */
        bool served;          /* some client connected once */
        bool forget;          /* Stop() was called: remove the persistent record too */
        unsigned max_connections;
        uid_t uid;            /* who created it: may connect through the socket */
        ExportState state;
        dc_disk *disk;
        dc_nbd_export *nbd;
        struct dc_nbd_export_stats last; /* as last announced */
        GPtrArray *stop_waiters; /* Stop() calls to answer once it is gone */
        /* called once it serves (R 0) or did not start (R < 0, ERROR why), when the starter wants to know */
        void (*on_live)(Manager *mgr, const char *name, int r, const char *error, void *userdata);
        void *on_live_userdata;
} Export;

/* A backup plan (plan.c, plan-run.c; its bus glue is bus-plan.c). */
enum { LEVEL_FULL, LEVEL_INCREMENTAL, LEVEL_DIFFERENTIAL, LEVEL_AUTO };
enum { POINT_UNVERIFIED, POINT_VERIFIED, POINT_DAMAGED };
enum { KEEP_LAST, KEEP_HOURLY, KEEP_DAILY, KEEP_WEEKLY, KEEP_MONTHLY, KEEP_YEARLY, KEEP_N };
typedef struct PlanSettings {
        char *chain;          /* the chain's active layer, absolute */
        char *destination;    /* absolute directory inside the roots, or an NBD URI (normalised): a replica */
        char *schedule;       /* systemd OnCalendar= */
        unsigned randomized_delay; /* seconds */
        int level;            /* LEVEL_* */
        unsigned full_every;  /* auto: a full point every this many runs */
        bool compress, prune;
        bool pull;            /* Mode=pull: the run reads a point-in-time view (fleecing) */
        char *bitmap;         /* the plan's bitmap on the active layer */
        uint64_t speed;       /* bytes/s, 0: no limit */
        unsigned keep[KEEP_N];
} PlanSettings;
typedef struct Point {
        char *id;             /* YYYYMMDDTHHMMSSZ, maybe with -N */
        uint64_t time;        /* µs since the epoch, the plan's clock at the run */
        int level;            /* LEVEL_FULL, _INCREMENTAL, _DIFFERENTIAL */
        char *file;           /* absolute */
        char *base;           /* the point whose file is its backing file, or NULL */
        uint64_t size, bytes; /* of the file; what the run copied */
        char *sums;           /* SHA-256 of each 64 MiB of the file, hex, comma-separated */
        int state;            /* POINT_* */
        char *error;          /* what Verify found damaged, or NULL */
} Point;
typedef struct Plan {
        Manager *mgr;
        char *name, *object, *file, *catalog;
        PlanSettings set;
        GPtrArray *points;    /* Point*, oldest first */
        uint64_t last_run, next_run; /* µs since the epoch, 0: never / unknown */
        char *last_result;
        char *pending;        /* a run's file that is not a point yet (NULL: none) */
        unsigned runs_since_full;
        /* a run */
        sd_bus_message *start_msg; /* Run() being started (dispatched again until the job starts) */
        bool prepared;        /* its destination made, its pending file recorded */
        bool running, busy;   /* a run's job or its aftermath; prune, verify, delete */
        char *job_id;
        int run_level;
        char *run_id, *run_file, *run_base, *run_fleece;
        uint64_t run_time, run_mono;
        bool force_full;      /* the last run was interrupted: the bitmap may have lost what it held */
        Point *run_replaced;  /* a replica's point, out of the catalog while its run starts */
} Plan;

/* log.c — the journal with structured fields, or stderr lines without one */
extern int log_max_level;
void log_setup(void);
/* FIELDS: NULL-terminated pairs of journal field name and value (NULL for none). */
void log_fields(int level, const char *const *fields, const char *fmt, ...) _printf_(3, 4);
#define log_error(...) log_fields(LOG_ERR, NULL, __VA_ARGS__)
#define log_warning(...) log_fields(LOG_WARNING, NULL, __VA_ARGS__)
#define log_notice(...) log_fields(LOG_NOTICE, NULL, __VA_ARGS__)
#define log_info(...) log_fields(LOG_INFO, NULL, __VA_ARGS__)
#define log_debug(...) log_fields(LOG_DEBUG, NULL, __VA_ARGS__)

/* config.c */
int config_load(Config *c, const char *file, char **cli_roots, const char *cli_state_dir, const char *cli_runtime_dir);
void config_done(Config *c);

/* errors.c — the one table from errno to D-Bus errors */
const char *bus_error_name(int err);
int bus_error_from_errno(sd_bus_error *e, int err, const char *message);
int reply_error_errno(sd_bus_message *m, int err, const char *message);
/* Answer W's call with the object of the image at PATH, made by W's work (or W's error). */
void reply_new_image(Work *w, const char *path);

/* registry.c — the daemon's own records: each image's format, and pivots */
int registry_open(const char *state_dir, char **roots, Registry **ret);
Registry *registry_free(Registry *r);
int registry_format(void *userdata, const char *abs, int fd, int hint, int *ret_format);
int registry_created(void *userdata, const char *abs, int fd, int format);
int registry_pivoted(void *userdata, const char *new_top, const char *const *dropped);
int registry_classify(Registry *r, const char *abs, int fd, int format);
/* The active layer a pivot replaced the file ABS (identity ST) with, or NULL; free() it. */
char *registry_superseded_by(Registry *r, const char *abs, const struct stat *st);
/* ABS no longer exists: forget it. */
void registry_forget(Registry *r, const char *abs);
unsigned registry_size(Registry *r);
/* Make the records written without a sync durable (at the end of each worker's item). */
void registry_sync(Registry *r);

/* polkit.c */
int polkit_verify(Manager *mgr, sd_bus_message *m, const char *action, const char *const *details,
                  sd_bus_error *error);
int polkit_setup(Manager *mgr);
void polkit_free(Manager *mgr);

/* work.c — everything that touches files, on the pool's threads (pool.c) */
typedef void (*work_fn)(Work *w);
struct Work {
        PoolItem item;
        Manager *mgr;
        sd_bus_message *m;    /* the call to answer, or NULL */
        work_fn run;          /* on a worker thread */
        work_fn done;         /* back on the event loop */
        void *data;
        void (*free_data)(void *data);
        int r;                /* result of run(): >= 0 or -errno */
        char *error;          /* dc_get_error() captured on the worker thread */
        char **refresh;       /* paths to read again after run(), on the worker thread */
        GPtrArray *scan;      /* what reading them found, applied before done() */
        bool operation;       /* a client's operation: counted against MaxOperations */
        char **holds;         /* paths our work has open read-write meanwhile */
};
/* A new item (NULL when out of memory; FREE_DATA has run then). */
Work *work_new(Manager *mgr, work_fn run, work_fn done, void *data, void (*free_data)(void *));
/*
 * Queue W.  With M, W is that call's operation: counted against
 * MaxOperations, and beyond it M is answered with LimitsExceeded and W
 * dropped.  Without M, W is internal work and never refused.
 */
int work_submit(Work *w, sd_bus_message *m);
/* Queue internal work W that takes long (a plan's checksums, streams, checks) on the client workers, not
 * on the internal thread that model refreshes need; not counted against MaxOperations. */
int work_submit_long(Work *w);
/* work_new() and work_submit() in one. */
int work_start(Manager *mgr, sd_bus_message *m, work_fn run, work_fn done, void *data, void (*free_data)(void *));
int workers_setup(Manager *mgr);
void workers_free(Manager *mgr);
void work_capture_error(Work *w, int r);

/* model.c — images, chains and their bus objects */
Image *image_free(Image *img);
void image_free_void(void *p);
Image *scan_one(Manager *mgr, const char *abs);
/* On a worker: read PATHS (files or directories; NULL = every root) as they are now, for model_apply(). */
GPtrArray *model_read_paths(Manager *mgr, char **paths);
int model_setup(Manager *mgr);
void model_free(Manager *mgr);
int model_scan_initial(Manager *mgr);
/* Apply what a worker read (Image entries; an entry with error ENOENT means the file is gone). */
void model_apply(Manager *mgr, GPtrArray *scan);
/* Set-aside status of PATHS changed (a job took or released them): announce what follows. */
void model_changed(Manager *mgr, char **paths);
/* Read PATHS again soon. */
void model_refresh(Manager *mgr, char **paths);
/*
 * Make the model current for a call naming PATHS: 1 when it is, 0 when a
 * refresh was started and M will be dispatched again afterwards.
 */
int model_freshen(Manager *mgr, sd_bus_message *m, char **paths, sd_bus_error *error);
Image *model_find(Manager *mgr, const char *abs);
char *image_object_path(const char *abs);
char *chain_object_path(const char *abs);
char **model_image_paths(Manager *mgr);
char **model_chain_paths(Manager *mgr);
Image *chain_active_from_object(Manager *mgr, const char *object);
Image *image_from_object(Manager *mgr, const char *object);
char **image_overlays(Manager *mgr, Image *img);
char **image_chains(Manager *mgr, Image *img);
char **chain_layers(Manager *mgr, Image *active);
GPtrArray *chain_layer_images(Manager *mgr, Image *active);
/* IMG's bitmap NAME as the model last read it (persistent, or a live export's transient one), or NULL. */
const struct dc_bitmap_info *image_bitmap(const Image *img, const char *name);
bool image_is_active(Manager *mgr, Image *img);
bool image_in_any_chain(Manager *mgr, Image *img);
const char *image_in_use(Manager *mgr, Image *img, char **ret_free);
/* The image whose external data file IMG is, or NULL. */
Image *image_data_file_of(Manager *mgr, Image *img);

/* bus-*.c — the vtables */
extern const sd_bus_vtable manager_vtable[];
extern const sd_bus_vtable image_vtable[];
extern const sd_bus_vtable chain_vtable[];
extern const sd_bus_vtable job_vtable[];
int bus_register(Manager *mgr);
int append_objects(sd_bus_message *m, char **paths);
int image_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                      sd_bus_error *error);
int chain_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                      sd_bus_error *error);

/* job.c — the Job model: lifecycle, events, progress, reservations, starting */
/* What a call that starts a job asked for, and what the start reserved (filled by bus-chain.c). */
typedef struct JobStart {
        Manager *mgr;
        int type;
        char *id, *chain_object, *overlay, *top, *base, *backing_file;
        char *target, *target_backing;
        bool create_target, target_made;
        struct stat target_st;
        struct dc_create_options co;
        struct dc_backup_options bo;
        char *bitmap;         /* bo.bitmap's storage */
        char *checkpoint;     /* bo.checkpoint's */
        struct dc_mirror_options mo;
        char **roots;
        char **paths;         /* claimed busy */
        char **expect;        /* the chain as authorized, active layer first */
        unsigned max_depth;
        uid_t uid;
        bool reserved;
        uint64_t started;     /* job_rate_now() as the job was started */
        struct dc_job_options jo;
        bool remote;          /* the target is an NBD URI (normalised) */
        bool remote_source;   /* TOP is one: a replica restored into TARGET, made of TARGET_SIZE bytes */
        uint64_t target_size;
        struct dc_nbd_client_options nbd;
        dc_job *job;
        char *d_images, *d_writes, *d_roots; /* polkit details */
        char *via;            /* the export whose write path the job uses, or NULL */
} JobStart;

int jobs_setup(Manager *mgr);
void jobs_free(Manager *mgr);
char **model_job_paths(Manager *mgr);
bool job_id_in_use(Manager *mgr, const char *id);
char *job_new_id(Manager *mgr, const char *type);
JobStart *job_start_new(Manager *mgr, int type, Image *active, GPtrArray *layers);
void job_start_free(void *p);
int job_start(Manager *mgr, sd_bus_message *m, JobStart *s, char **paths, sd_bus_error *error);

/* remote.c — NBD URI targets: connect the Unix socket PATH with UID's rights (root: directly); a socket, or
 * -errno with dc_set_error's reason (EACCES: UID may not connect to it). */
int remote_connect_unix_as(uid_t uid, const char *path);

/* bus-job.c — the Job's bus glue; the model announces through the job_send_* calls */
int job_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                    sd_bus_error *error);
int append_job_infos(Manager *mgr, sd_bus_message *reply);
int caller_uid(sd_bus_message *m, uid_t *ret);
/* The signal for EV (and the properties a status change or an error refreshes). */
void job_send_event(Job *j, const struct dc_job_event *ev);
void job_send_changed(Job *j, char **props);
/* J appeared on the bus / left it: the object, and its chain's Jobs. */
void job_send_added(Job *j);
void job_send_removed(Job *j);

/* export.c — the NBD exports: starting, following the chain, stopping, records */
int exports_setup(Manager *mgr);
/* At exit: stop every export here and now (on the loop). */
void exports_free(Manager *mgr);
/* Recreate the persistent exports recorded in the state directory. */
void exports_restore(Manager *mgr);
Export *export_of_path(Manager *mgr, const char *path);
/* LAYERS (a chain's images) as an export claims them (with data files) and as its open must find them. */
void export_chain_lists(GPtrArray *layers, char ***ret_paths, char ***ret_expect);
/* The exports on the bus (starting ones are not), as object paths. */
char **model_export_paths(Manager *mgr);
bool export_name_valid(const char *name);
char *export_default_name(Manager *mgr, const char *active, const char *suffix);
/* Start exporting ACTIVE's chain (LAYERS: its images, the claims) as E describes; M answered when it is live. */
/* The names of the cache modes, in DC_CACHE_* order, NULL-terminated (jobs' and exports' option "cache"). */
extern const char *const cache_modes[];

typedef struct ExportStart {
        char *name, *active, *socket;
        char *tcp;            /* as asked ("ADDR:PORT"; port 0: the kernel picks), or NULL */
        bool tls;
        char **paths, **expect;
        bool writable, persistent, anonymous;
        int cache;            /* DC_CACHE_* of the export's guest I/O */
        char *bitmap;         /* a bitmap of the active layer for qemu:dirty-bitmap, or NULL */
        bool snapshot, discard_after_read, break_snapshot; /* a point-in-time view (Export's fields) */
        unsigned cbw_timeout_ms;
        char *checkpoint;
        unsigned max_connections;
        uid_t uid;
        int fd;               /* OpenNBD: the socket to serve at once (or -1) */
        int client_fd;        /* OpenNBD: its other end, the call's answer (or -1) */
        /* called once it serves (R 0) or did not start (R < 0, ERROR why), when the starter wants to know */
        void (*on_live)(Manager *mgr, const char *name, int r, const char *error, void *userdata);
        void *on_live_userdata;
} ExportStart;
int export_start(Manager *mgr, sd_bus_message *m, ExportStart *es, sd_bus_error *error);
void export_start_clear(ExportStart *es);
/* Stop E (Stop() or the last OpenNBD client left); M (or NULL) answered when it is gone. */
void export_stop(Export *e, sd_bus_message *m, bool forget);
/* The chains' active layers may have moved (a pivot): follow them. */
void exports_follow(Manager *mgr);
/* E's chain has the new active layer OVERLAY (a snapshot through its disk). */
void export_moved(Export *e);
/* Serve the connected socket FD on E (owned from now on). */
int export_serve_fd(Export *e, int fd);
/*
 * May an export listen on TCP (an "ADDR:PORT" of Chain.Export's 'tcp')?
 * Decided by [NBD] TCPListen=, and then whether it needs TLS (*RET_TLS):
 * always, but on a loopback address with TCPPlaintextLoopback=yes; TLS
 * without credentials configured is an error.  Sets ERROR and returns < 0
 * when it may not.
 */
int export_tcp_check(Manager *mgr, const char *tcp, bool *ret_tls, sd_bus_error *error);
/* "ADDR" or "ADDR:PORT" (PORT required when NEED_PORT); IPv6 in brackets when a port follows. */
int tcp_address_parse(const char *s, bool need_port, struct sockaddr_storage *ret, socklen_t *ret_len,
                      bool *ret_has_port);

/* plan.c, plan-run.c, bus-plan.c */
extern const char *const plan_keep_keys[];
extern const sd_bus_vtable plan_vtable[];
const char *plan_level_name(int level);
int plan_level_from(const char *s);
const char *plan_state_name(int state);
uint64_t plan_now(void);
bool plan_name_valid(const char *name);
void point_free(void *p);
Point *plan_point(Plan *p, const char *id);
/* How a plan's worker reads a replica back: TLS as the jobs, sockets with the daemon's (root's) rights. */
struct dc_nbd_client_options plan_nbd_options(Manager *mgr);
/* Remove PATH (a file a plan's run or restore made and nothing uses) on a worker. */
void plan_remove_later(Manager *mgr, const char *path);
/* Is the destination an NBD URI: a replica, one export updated in place? */
bool plan_replica(const PlanSettings *s);
void plan_settings_defaults(const char *name, PlanSettings *s);
void plan_settings_clear(PlanSettings *s);
int plan_settings_check(Manager *mgr, const char *name, PlanSettings *s, char **ret_error);
int plan_settings_parse(Manager *mgr, const char *name, const char *text, PlanSettings *s, char **ret_error);
char *plan_settings_format(const char *name, const PlanSettings *s);
/* A plan of SET (taken), its catalog parsed from CATALOG_TEXT (NULL: none). */
Plan *plan_new(Manager *mgr, const char *name, PlanSettings *set, const char *catalog_text);
char *plan_catalog_path(Manager *mgr, const char *name);
Plan *plan_free(Plan *p);
void plan_free_void(void *p);
void plans_load(Manager *mgr);
char **model_plan_paths(Manager *mgr);
bool plans_busy(Manager *mgr);
void plan_catalog_save_async(Plan *p);
/* The catalog as it is now, to be written on a worker by plan_catalog_write (which frees it). */
void *plan_catalog_snapshot(Plan *p);
void plan_catalog_write(void *snapshot);
void plan_catalog_snapshot_free(void *snapshot);
int plan_file_sums(const char *abs, char **roots, char **ret, uint64_t *ret_size);
/* The same of a point's FILE, a path or a replica's URI (read over NBD as O says). */
int plan_sums(const char *file, char **roots, const struct dc_nbd_client_options *o, char **ret, uint64_t *ret_size);
char *plan_sums_differ(const char *sums, const char *now, uint64_t size_then, uint64_t size_now);
void plan_retention(GPtrArray *points, const unsigned *keep, bool *keep_out, char **reason_out);
int plan_run(Plan *p, sd_bus_message *m, sd_bus_error *error);
int plan_verify(Plan *p, sd_bus_message *m, const char *point, sd_bus_error *error);
int plan_prune(Plan *p, sd_bus_message *m, bool dry_run, sd_bus_error *error);
int plan_restore(Plan *p, sd_bus_message *m, const char *point, const char *target, int format, bool live,
                 bool chain, const char *export_name, sd_bus_error *error);
/* Job ID reached concluded (ERROR NULL: completed; CANCELLED), having copied BYTES: a plan's run ends. */
void plans_job_concluded(Manager *mgr, const char *id, const char *error, bool cancelled, uint64_t bytes);
void plan_send_changed(Plan *p, char **props);
void plan_send_added(Plan *p);
void plan_send_removed(Plan *p);
int plan_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                     sd_bus_error *error);
int method_create_plan(sd_bus_message *m, void *userdata, sd_bus_error *error);
int method_list_plans(sd_bus_message *m, void *userdata, sd_bus_error *error);
/* NextRun from the schedule, on a worker. */
void plan_next_run_refresh(Plan *p);
/* bus-chain.c: a stream of ACTIVE's whole chain into it (flatten), for an instant recovery, already authorized */
int stream_start_internal(sd_bus_message *m, Image *active, sd_bus_error *error);
/* bus-chain.c: a restore of a plan's replica (an NBD export) into a new image (see there) */
int restore_remote_start(Manager *mgr, sd_bus_message *m, const char *uri, uint64_t size, const char *target_abs,
                         int format, const char *action, const char *const *more, char **ret_id,
                         sd_bus_error *error);
/* bus-chain.c: a backup the daemon starts for a plan's run or a restore (see there) */
int backup_start_internal(sd_bus_message *m, Image *source, const char *target_abs, const char *target_backing,
                          int format, const struct dc_backup_options *bo, uint64_t speed, const char *action,
                          const char *const *more, char **ret_id, sd_bus_error *error);

/* bus-export.c */
extern const sd_bus_vtable export_vtable[];
int export_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                       sd_bus_error *error);
int method_chain_export(sd_bus_message *m, void *userdata, sd_bus_error *error);
int method_chain_open_nbd(sd_bus_message *m, void *userdata, sd_bus_error *error);
int property_get_chain_exports(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error);
void export_send_added(Export *e);
void export_send_removed(Export *e);
void export_send_changed(Export *e, char **props);

/* manager.c */
int manager_new(Manager **ret, const Config *config);
Manager *manager_free(Manager *mgr);
bool manager_is_idle(Manager *mgr);
int manager_resolve_path(Manager *mgr, const char *path, char **ret_abs, sd_bus_error *error);
typedef struct Option {
        char type;            /* D-Bus type of the variant */
        uint64_t u;           /* y, q, u, t, n, i, x */
        int64_t i;
        bool b;
        char *s;              /* s, o */
} Option;
int parse_options(sd_bus_message *m, const char *const *allowed, GHashTable **ret, sd_bus_error *error);
int opt_string(GHashTable *o, const char *key, const char **ret, sd_bus_error *error);
int opt_uint(GHashTable *o, const char *key, uint64_t *ret, sd_bus_error *error);
/* The option 'checkpoint': a new bitmap's name (1..1023 bytes), for ACTIVE, a qcow2 image. */
int opt_checkpoint(GHashTable *o, const Image *active, const char **ret, sd_bus_error *error);
int opt_bool(GHashTable *o, const char *key, bool *ret, sd_bus_error *error);
int opt_enum(GHashTable *o, const char *key, const char *const *values, int *ret, sd_bus_error *error);
const char *root_of(Manager *mgr, const char *abs);
/* polkit details: "images" (every image, one per line), "roots" (their roots, one per line). */
char *paths_joined(char **paths);
char *roots_joined(Manager *mgr, char **paths);
