/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The Manager: owns the event loop, the bus connection and the model. */

#include <errno.h>
#include <stdio.h>

#include "daemon.h"

int manager_new(Manager **ret, const Config *config) {
        Manager *mgr = calloc(1, sizeof *mgr);
        int r;

        if (!mgr)
                return -ENOMEM;
        mgr->config = *config;
        mgr->claims = claims_new();
        mgr->inotify_fd = -1;
        mgr->job_fd = -1;
        mgr->export_fd = -1;
        r = registry_open(config->state_dir, config->roots, &mgr->registry);
        if (r < 0) {
                free(mgr);
                return r;
        }
        mgr->oracle = (struct dc_format_oracle){ .format = registry_format, .created = registry_created,
                                                 .userdata = mgr->registry };
        r = sd_event_default(&mgr->event);
        if (r >= 0)
                r = model_setup(mgr);
        if (r >= 0)
                r = workers_setup(mgr);
        if (r >= 0)
                r = jobs_setup(mgr);
        if (r >= 0)
                r = exports_setup(mgr);
        if (r >= 0)
                mgr->plans = g_hash_table_new_full(g_str_hash, g_str_equal, free, plan_free_void);
        if (r < 0) {
                manager_free(mgr);
                return r;
        }
        *ret = mgr;
        return 0;
}

Manager *manager_free(Manager *mgr) {
        if (!mgr)
                return NULL;
        jobs_free(mgr);
        workers_free(mgr);
        if (mgr->plans)
                g_hash_table_destroy(mgr->plans);
        exports_free(mgr);
        polkit_free(mgr);
        model_free(mgr);
        registry_free(mgr->registry);
        claims_free(mgr->claims);
        sd_bus_flush_close_unref(mgr->bus);
        sd_event_unref(mgr->event);
        config_done(&mgr->config);
        free(mgr);
        return NULL;
}

bool manager_is_idle(Manager *mgr) {
        /* a job keeps us up while it runs, and until dismissed when concluded */
        /* and an export as long as it exists */
        return mgr->operations == 0 && g_hash_table_size(mgr->polkit) == 0 && g_hash_table_size(mgr->job_ids) == 0 &&
               (!mgr->exports || g_hash_table_size(mgr->exports) == 0) && !plans_busy(mgr) &&
               !mgr->refresh_running && mgr->waiters_now->len == 0 && mgr->waiters_next->len == 0;
}

const char *root_of(Manager *mgr, const char *abs) {
        for (char **r = mgr->config.roots; *r; r++) {
                size_t l = strlen(*r);
                if (strncmp(abs, *r, l) == 0 && abs[l] == '/')
                        return *r;
        }
        return "";
}

int manager_resolve_path(Manager *mgr, const char *path, char **ret_abs, sd_bus_error *error) {
        int r = dc_path_resolve(path, (const char *const *) mgr->config.roots, ret_abs, NULL);
        if (r < 0)
                return bus_error_from_errno(error, r, dc_get_error());
        return 0;
}

char *paths_joined(char **paths) {
        return g_strjoinv("\n", paths);
}

char *roots_joined(Manager *mgr, char **paths) {
        g_autoptr(GPtrArray) a = g_ptr_array_new();
        for (char **p = paths; p && *p; p++) {
                const char *r = root_of(mgr, *p);
                bool have = false;
                for (guint i = 0; i < a->len; i++)
                        have |= strcmp(a->pdata[i], r) == 0;
                if (!have)
                        g_ptr_array_add(a, (char *) r);
        }
        g_ptr_array_add(a, NULL);
        return g_strjoinv("\n", (char **) a->pdata);
}

/* --- a{sv} options ----------------------------------------------------------- */

static void option_free(void *p) {
        Option *o = p;
        if (o)
                free(o->s);
        free(o);
}

int parse_options(sd_bus_message *m, const char *const *allowed, GHashTable **ret, sd_bus_error *error) {
        g_autoptr(GHashTable) t = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, option_free);
        int r;

        r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *key, *contents;
                Option *o;
                char type;
                bool ok = false;

                r = sd_bus_message_read(m, "s", &key);
                if (r < 0)
                        return r;
                for (const char *const *a = allowed; a && *a; a++)
                        if (strcmp(*a, key) == 0)
                                ok = true;
                if (!ok)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "unknown option '%s'", key);
                r = sd_bus_message_peek_type(m, &type, &contents);
                if (r < 0)
                        return r;
                o = calloc(1, sizeof *o);
                if (!o)
                        return -ENOMEM;
                g_hash_table_replace(t, g_strdup(key), o);
                o->type = contents[0];
                r = sd_bus_message_enter_container(m, 'v', contents);
                if (r < 0)
                        return r;
                switch (contents[0]) {
                case 's':
                case 'o': {
                        const char *s;
                        r = sd_bus_message_read_basic(m, contents[0], &s);
                        if (r >= 0)
                                o->s = strdup(s);
                        break;
                }
                case 'b': {
                        int b;
                        r = sd_bus_message_read_basic(m, 'b', &b);
                        o->b = b;
                        break;
                }
                case 'y': { uint8_t v; r = sd_bus_message_read_basic(m, 'y', &v); o->u = v; break; }
                case 'q': { uint16_t v; r = sd_bus_message_read_basic(m, 'q', &v); o->u = v; break; }
                case 'u': { uint32_t v; r = sd_bus_message_read_basic(m, 'u', &v); o->u = v; break; }
                case 't': { uint64_t v; r = sd_bus_message_read_basic(m, 't', &v); o->u = v; break; }
                case 'n': { int16_t v; r = sd_bus_message_read_basic(m, 'n', &v); o->i = v; o->u = (uint64_t) v; break; }
                case 'i': { int32_t v; r = sd_bus_message_read_basic(m, 'i', &v); o->i = v; o->u = (uint64_t) v; break; }
                case 'x': { int64_t v; r = sd_bus_message_read_basic(m, 'x', &v); o->i = v; o->u = (uint64_t) v; break; }
                default:
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "option '%s' has unsupported type '%s'", key, contents);
                }
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(m);
                if (r >= 0)
                        r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        r = sd_bus_message_exit_container(m);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(t);
        return 0;
}

int opt_string(GHashTable *t, const char *key, const char **ret, sd_bus_error *error) {
        Option *o = g_hash_table_lookup(t, key);
        if (!o)
                return 0;
        if (o->type != 's' && o->type != 'o')
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "option '%s' must be a string", key);
        *ret = o->s;
        return 1;
}

int opt_checkpoint(GHashTable *t, const Image *active, const char **ret, sd_bus_error *error) {
        int r = opt_string(t, "checkpoint", ret, error);

        if (r <= 0)
                return r;
        if (!**ret || strlen(*ret) > 1023)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "checkpoint must be a name of 1..1023 bytes");
        if (active->format != DC_FORMAT_QCOW2)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "'%s' is a raw image: only qcow2 images store persistent bitmaps",
                                         active->path);
        return 1;
}

int opt_uint(GHashTable *t, const char *key, uint64_t *ret, sd_bus_error *error) {
        Option *o = g_hash_table_lookup(t, key);
        if (!o)
                return 0;
        if (!strchr("yqutnix", o->type) || (strchr("nix", o->type) && o->i < 0))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "option '%s' must be a non-negative integer", key);
        *ret = o->u;
        return 1;
}

int opt_bool(GHashTable *t, const char *key, bool *ret, sd_bus_error *error) {
        Option *o = g_hash_table_lookup(t, key);
        if (!o)
                return 0;
        if (o->type != 'b')
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "option '%s' must be a boolean", key);
        *ret = o->b;
        return 1;
}

int opt_enum(GHashTable *t, const char *key, const char *const *values, int *ret, sd_bus_error *error) {
        const char *s = NULL;
        g_autofree char *list = NULL;
        int r = opt_string(t, key, &s, error);

        if (r <= 0)
                return r;
        for (int i = 0; values[i]; i++)
                if (strcmp(values[i], s) == 0) {
                        *ret = i;
                        return 1;
                }
        list = g_strjoinv("', '", (char **) values);
        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "option '%s': '%s' is not one of '%s'", key, s,
                                 list);
}

int append_objects(sd_bus_message *m, char **paths) {
        int r = sd_bus_message_open_container(m, 'a', "o");
        for (char **p = paths; r >= 0 && p && *p; p++)
                r = sd_bus_message_append_basic(m, 'o', *p);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        return r;
}

/* --- registration ------------------------------------------------------------ */

static int enumerate_images(sd_bus *bus, const char *prefix, void *userdata, char ***ret, sd_bus_error *error) {
        *ret = model_image_paths(userdata);
        return 0;
}

static int enumerate_jobs(sd_bus *bus, const char *prefix, void *userdata, char ***ret, sd_bus_error *error) {
        *ret = model_job_paths(userdata);
        return 0;
}

static int enumerate_exports(sd_bus *bus, const char *prefix, void *userdata, char ***ret, sd_bus_error *error) {
        *ret = model_export_paths(userdata);
        return 0;
}

static int enumerate_plans(sd_bus *bus, const char *prefix, void *userdata, char ***ret, sd_bus_error *error) {
        *ret = model_plan_paths(userdata);
        return 0;
}

static int enumerate_chains(sd_bus *bus, const char *prefix, void *userdata, char ***ret, sd_bus_error *error) {
        *ret = model_chain_paths(userdata);
        return 0;
}

int bus_register(Manager *mgr) {
        int r;

        r = sd_bus_add_object_vtable(mgr->bus, NULL, MANAGER_PATH, IFACE_MANAGER, manager_vtable, mgr);
        if (r >= 0)
                r = sd_bus_add_object_manager(mgr->bus, NULL, MANAGER_PATH);
        if (r >= 0)
                r = sd_bus_add_fallback_vtable(mgr->bus, NULL, IMAGE_PREFIX, IFACE_IMAGE, image_vtable,
                                               image_object_find, mgr);
        if (r >= 0)
                r = sd_bus_add_node_enumerator(mgr->bus, NULL, IMAGE_PREFIX, enumerate_images, mgr);
        if (r >= 0)
                r = sd_bus_add_fallback_vtable(mgr->bus, NULL, CHAIN_PREFIX, IFACE_CHAIN, chain_vtable,
                                               chain_object_find, mgr);
        if (r >= 0)
                r = sd_bus_add_node_enumerator(mgr->bus, NULL, CHAIN_PREFIX, enumerate_chains, mgr);
        if (r >= 0)
                r = sd_bus_add_fallback_vtable(mgr->bus, NULL, JOB_PREFIX, IFACE_JOB, job_vtable, job_object_find, mgr);
        if (r >= 0)
                r = sd_bus_add_node_enumerator(mgr->bus, NULL, JOB_PREFIX, enumerate_jobs, mgr);
        if (r >= 0)
                r = sd_bus_add_fallback_vtable(mgr->bus, NULL, EXPORT_PREFIX, IFACE_EXPORT, export_vtable,
                                               export_object_find, mgr);
        if (r >= 0)
                r = sd_bus_add_node_enumerator(mgr->bus, NULL, EXPORT_PREFIX, enumerate_exports, mgr);
        if (r >= 0)
                r = sd_bus_add_fallback_vtable(mgr->bus, NULL, PLAN_PREFIX, IFACE_PLAN, plan_vtable, plan_object_find,
                                               mgr);
        if (r >= 0)
                r = sd_bus_add_node_enumerator(mgr->bus, NULL, PLAN_PREFIX, enumerate_plans, mgr);
        return r;
}
