/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "diskchain.h"

#define BUS_NAME "org.diskchain.DiskChain1"
#define MANAGER_PATH "/org/diskchain/DiskChain1"
#define IMAGE_PREFIX MANAGER_PATH "/image"
#define CHAIN_PREFIX MANAGER_PATH "/chain"
#define JOB_PREFIX MANAGER_PATH "/job"
#define IFACE_MANAGER BUS_NAME ".Manager"
#define IFACE_IMAGE BUS_NAME ".Image"
#define IFACE_CHAIN BUS_NAME ".Chain"
#define ERROR_PREFIX BUS_NAME ".Error."

#define _cleanup_(f) __attribute__((cleanup(f)))
static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)
#define TAKE_PTR(p)                       \
        ({                                \
                __typeof__(p) _tp_ = (p); \
                (p) = NULL;               \
                _tp_;                     \
        })

typedef struct Manager Manager;

/* What the storage roots hold, as last scanned. */
typedef struct Image {
        Manager *mgr;
        char *path;           /* absolute */
        char *object;         /* bus object path */
        int format;
        uint64_t virtual_size, actual_size;
        uint32_t cluster_size;
        char *compat, *compression_type, *backing_file, *backing_format;
        char *backing_abs;    /* resolved backing path, or NULL */
        bool dirty, corrupt, encrypted, read_only;
        char *superseded_by;  /* a pivot replaced this layer with that active layer ("" = no) */
        char *job_target;     /* the job whose target this is while it runs ("" = none) */
        char *error;          /* set when the file could not be parsed: not exported */
        int error_errno;
} Image;

typedef struct Config {
        char **roots;         /* NULL-terminated */
        unsigned max_jobs;
        unsigned max_depth;
        uint64_t idle_timeout_usec;
} Config;

struct Manager {
        sd_event *event;
        sd_bus *bus;
        Config config;
        GHashTable *images;   /* path -> Image* (including unparsable files) */
        GHashTable *polkit;   /* sd_bus_message* -> PolkitQuery* */
        unsigned work_in_flight;
        bool scan_running, scan_again;
        int notify_fd;
        sd_event_source *notify_source, *rescan_timer;
        GHashTable *watches;  /* directory -> inotify sd_event_source */
        GMutex done_lock;
        GQueue *done;         /* finished Work items waiting for the loop */
        GHashTable *jobs;     /* id -> Job* */
        GHashTable *busy;     /* image path -> job id, for images a job uses */
        int job_fd;           /* eventfd: some job has events */
        sd_event_source *job_source, *progress_timer;
        unsigned job_counter;
};

typedef struct Job {
        Manager *mgr;
        dc_job *dj;
        char *id, *object, *chain_object;
        char *top, *base, *target;
        char **paths;         /* images held busy */
        uid_t uid;
        uint64_t start_time;  /* µs since the epoch */
        int type, status;
        uint64_t last_offset, last_len, rate, rate_t0, rate_off0;
        struct dc_job_info last;
} Job;

/* config.c */
int config_load(Config *c, const char *file, char **cli_roots);
void config_done(Config *c);

/* errors.c */
int bus_error_from_errno(sd_bus_error *e, int err, const char *message, const char *einval_name);
int reply_error_errno(sd_bus_message *m, int err, const char *message, const char *einval_name);

/* polkit.c */
int polkit_verify(Manager *mgr, sd_bus_message *m, const char *action, const char **details, sd_bus_error *error);
void polkit_registry_free(Manager *mgr);
GHashTable *polkit_registry_new(void);
#define _fallthrough_ __attribute__((fallthrough))

/* worker.c — run image I/O off the event loop */
typedef struct Work Work;
typedef void (*work_fn)(Work *w);
struct Work {
        Manager *mgr;
        sd_bus_message *m;    /* the call to answer, or NULL */
        work_fn run;          /* on a worker thread */
        work_fn done;         /* back on the event loop */
        void *data;
        void (*free_data)(void *data);
        int r;                /* result of run(): >= 0 or -errno */
        char *error;          /* dc_get_error() captured on the worker thread */
        GPtrArray *scan;      /* images rescanned after a change, or NULL */
        bool rescan;          /* rescan the roots after run() */
};
int work_start(Manager *mgr, sd_bus_message *m, work_fn run, work_fn done, void *data, void (*free_data)(void *),
               bool rescan);
int worker_setup(Manager *mgr);
void work_capture_error(Work *w, int r);
/* Answer W's call with the object of the image at PATH, made by W's work (or W's error). */
void reply_new_image(Work *w, const char *path);

/* model.c — images, chains and their bus objects */
Image *image_free(Image *img);
void image_free_void(void *p);
GPtrArray *scan_roots(Manager *mgr);
void model_apply_scan(Manager *mgr, GPtrArray *scan);
int model_request_rescan(Manager *mgr);
Image *model_find(Manager *mgr, const char *abs);
char *image_object_path(const char *abs);
char *chain_object_path(const char *abs);
char **model_image_paths(Manager *mgr);
char **model_chain_paths(Manager *mgr);
Image *chain_active_from_object(Manager *mgr, const char *object);
char **image_overlays(Manager *mgr, Image *img);
char **image_chains(Manager *mgr, Image *img);
char **chain_layers(Manager *mgr, Image *active);
bool image_is_active(Manager *mgr, Image *img);
int model_watch_dir(Manager *mgr, const char *dir);

/* bus-*.c — the vtables */
extern const sd_bus_vtable manager_vtable[];
extern const sd_bus_vtable image_vtable[];
extern const sd_bus_vtable chain_vtable[];
int bus_register(Manager *mgr);
int append_objects(sd_bus_message *m, char **paths);
int image_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                      sd_bus_error *error);
int chain_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                      sd_bus_error *error);

/* bus-job.c */
#define IFACE_JOB BUS_NAME ".Job"
extern const sd_bus_vtable job_vtable[];
int job_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                    sd_bus_error *error);
int jobs_setup(Manager *mgr);
void jobs_free(Manager *mgr);
int job_register(Manager *mgr, dc_job *dj, sd_bus_message *m, const char *chain_object, const char *top,
                 const char *base, const char *target, char **paths, Job **ret);
char **model_job_paths(Manager *mgr);
const char *busy_job(Manager *mgr, const char *path);
int append_job_infos(Manager *mgr, sd_bus_message *reply);
char *job_new_id(Manager *mgr, const char *type);
void job_notify(void *userdata);
GPtrArray *chain_layer_images(Manager *mgr, Image *active);
int caller_uid(sd_bus_message *m, uid_t *ret);

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
int opt_bool(GHashTable *o, const char *key, bool *ret, sd_bus_error *error);
int opt_enum(GHashTable *o, const char *key, const char *const *values, int *ret, sd_bus_error *error);
const char *root_of(Manager *mgr, const char *abs);
