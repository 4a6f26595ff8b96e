/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * org.diskchain.DiskChain1.Export, and the Chain's Export, OpenNBD and
 * Exports: the bus glue of the NBD exports (the model is export.c).
 *
 * Design notes
 * ------------
 * - Chain.Export reads and checks the options (a 'tcp' address against
 *   [NBD] TCPListen= and the TLS it needs, export_tcp_check()), makes the
 *   model current for the chain, asks polkit (org.diskchain.export, with
 *   the chain, every image, writable, the socket, tcp and tls in the
 *   details) and hands the rest to
 *   export_start(), which reserves the name and claims the images at once.
 * - Chain.OpenNBD hands the caller one end of a socket pair whose other
 *   end the chain's export serves (the caller needs no file system access),
 *   as machined hands out a pty: through the chain's export when it has
 *   one (with its writability), otherwise through an export made for the
 *   call, which ends with its last connection.  polkit decides every call:
 *   that is how a user other than an export's creator gets in.
 * - Stop() leaves the object on the bus until the export is gone: the
 *   call is answered then.
 */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#include "daemon.h"

int export_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                       sd_bus_error *error) {
        Manager *mgr = userdata;
        _cleanup_free_ char *name = NULL;
        Export *e;

        if (sd_bus_path_decode(path, EXPORT_PREFIX, &name) <= 0)
                return 0;
        e = g_hash_table_lookup(mgr->exports, name);
        if (!e || e->state == EXPORT_STARTING)
                return 0;
        *found = e;
        return 1;
}

#define EXP ((Export *) userdata)

static int property_get_name(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", EXP->name);
}

static int property_get_chain(sd_bus *bus, const char *path, const char *iface, const char *prop,
                              sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "o", EXP->chain_object ? EXP->chain_object : "/");
}

static int property_get_writable(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                 sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "b", EXP->writable);
}

static int property_get_snapshot(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                 sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "b", EXP->snapshot);
}

static int property_get_cache(sd_bus *bus, const char *path, const char *iface, const char *prop,
                              sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", cache_modes[EXP->cache]);
}

static int property_get_bitmap(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", EXP->bitmap ? EXP->bitmap : "");
}

static int property_get_uri(sd_bus *bus, const char *path, const char *iface, const char *prop,
                            sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        g_autofree char *uri = EXP->socket ? g_strdup_printf("nbd+unix:///%s?socket=%s", EXP->name, EXP->socket)
                               : EXP->tcp  ? g_strdup_printf("%s://%s/%s", EXP->tls ? "nbds" : "nbd", EXP->tcp, EXP->name)
                                           : g_strdup("");
        return sd_bus_message_append(reply, "s", uri);
}

static int property_get_counter(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        const struct dc_nbd_export_stats *s = &EXP->last;
        if (strcmp(prop, "Clients") == 0)
                return sd_bus_message_append(reply, "u", s->clients);
        return sd_bus_message_append(reply, "t", strcmp(prop, "BytesRead") == 0 ? s->bytes_read : s->bytes_written);
}

static int method_stop(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Export *e = EXP;
        int r;

        r = polkit_verify(e->mgr, m, "org.diskchain.export",
                          (const char *const[]){ "path", e->active, "root", root_of(e->mgr, e->active), "operation",
                                                 "unexport", "name", e->name, NULL },
                          error);
        if (r <= 0)
                return r < 0 ? r : 1;
        export_stop(e, m, true);
        return 1;
}

const sd_bus_vtable export_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Name", "s", property_get_name, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Chain", "o", property_get_chain, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Writable", "b", property_get_writable, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Cache", "s", property_get_cache, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Bitmap", "s", property_get_bitmap, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Snapshot", "b", property_get_snapshot, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Uri", "s", property_get_uri, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Clients", "u", property_get_counter, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("BytesRead", "t", property_get_counter, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("BytesWritten", "t", property_get_counter, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD("Stop", NULL, NULL, method_stop, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

void export_send_added(Export *e) {
        (void) sd_bus_emit_object_added(e->mgr->bus, e->object);
        if (e->chain_object)
                (void) sd_bus_emit_properties_changed(e->mgr->bus, e->chain_object, IFACE_CHAIN, "Exports", NULL);
}

void export_send_removed(Export *e) {
        (void) sd_bus_emit_object_removed(e->mgr->bus, e->object);
        if (e->chain_object)
                (void) sd_bus_emit_properties_changed(e->mgr->bus, e->chain_object, IFACE_CHAIN, "Exports", NULL);
}

void export_send_changed(Export *e, char **props) {
        (void) sd_bus_emit_properties_changed_strv(e->mgr->bus, e->object, IFACE_EXPORT, props);
        if (g_strv_contains((const char *const *) props, "Chain"))
                (void) sd_bus_emit_properties_changed(e->mgr->bus, e->chain_object, IFACE_CHAIN, "Exports", NULL);
}

/* --- on the Chain ---------------------------------------------------------------- */

#define ACTIVE ((Image *) userdata)

int property_get_chain_exports(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        g_autofree char *me = chain_object_path(ACTIVE->path);
        GHashTableIter it;
        Export *e;
        int r = sd_bus_message_open_container(reply, 'a', "o");

        g_hash_table_iter_init(&it, ACTIVE->mgr->exports);
        while (r >= 0 && g_hash_table_iter_next(&it, NULL, (void **) &e))
                if (e->state != EXPORT_STARTING && e->chain_object && strcmp(e->chain_object, me) == 0)
                        r = sd_bus_message_append(reply, "o", e->object);
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

/*
 * What Export and OpenNBD do first: the model made current for the chain
 * (1, or 0 while it waits), every layer usable (an error naming the first
 * that is not), ES's claims and expected chain filled in.
 */
static int export_prepare(sd_bus_message *m, Image *active, GPtrArray *layers, ExportStart *es,
                          sd_bus_error *error) {
        int r;

        export_chain_lists(layers, &es->paths, &es->expect);
        r = model_freshen(active->mgr, m, es->paths, error);
        if (r <= 0)
                return r;
        for (guint i = 0; i < layers->len; i++) {
                Image *l = layers->pdata[i];
                if (l->error)
                        return bus_error_from_errno(error, l->error_errno, l->error);
                if (l->superseded_by)
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' was replaced by '%s' at a pivot",
                                                 l->path, l->superseded_by);
        }
        return 1;
}

int method_chain_export(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "name",       "writable",   "socket",     "tcp",
                                               "max-connections",      "persistent", "cache",
                                               "bitmap",     "snapshot",   "discard-after-read",
                                               "on-cbw-error",         "checkpoint", "cbw-timeout", NULL };
        static const char *const cbw_errors[] = { "break-guest-write", "break-snapshot", NULL };
        Image *active = ACTIVE;
        Manager *mgr = active->mgr;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(mgr, active);
        _cleanup_(export_start_clear) ExportStart es = { .fd = -1, .client_fd = -1 };
        g_autofree char *images = NULL, *roots = NULL;
        const char *name = NULL, *sock = NULL, *tcp = NULL, *bitmap = NULL, *checkpoint = NULL;
        uint64_t maxc = 0, cbw_timeout = 0;
        int r, cbw_error = 0;

        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        if ((r = opt_string(opts, "name", &name, error)) < 0 || (r = opt_bool(opts, "writable", &es.writable, error)) < 0 ||
            (r = opt_string(opts, "socket", &sock, error)) < 0 || (r = opt_string(opts, "tcp", &tcp, error)) < 0 ||
            (r = opt_uint(opts, "max-connections", &maxc, error)) < 0 ||
            (r = opt_bool(opts, "persistent", &es.persistent, error)) < 0 ||
            (r = opt_enum(opts, "cache", cache_modes, &es.cache, error)) < 0 ||
            (r = opt_string(opts, "bitmap", &bitmap, error)) < 0 ||
            (r = opt_bool(opts, "snapshot", &es.snapshot, error)) < 0 ||
            (r = opt_bool(opts, "discard-after-read", &es.discard_after_read, error)) < 0 ||
            (r = opt_enum(opts, "on-cbw-error", cbw_errors, &cbw_error, error)) < 0 ||
            (r = opt_checkpoint(opts, active, &checkpoint, error)) < 0 ||
            (r = opt_uint(opts, "cbw-timeout", &cbw_timeout, error)) < 0)
                return r;
        es.break_snapshot = cbw_error == 1;
        if (cbw_timeout > 86400)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "cbw-timeout is 0..86400 seconds");
        es.cbw_timeout_ms = (unsigned) cbw_timeout * 1000;
        if (!es.snapshot && (g_hash_table_contains(opts, "discard-after-read") ||
                             g_hash_table_contains(opts, "on-cbw-error") || g_hash_table_contains(opts, "cbw-timeout") ||
                             checkpoint))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "discard-after-read, on-cbw-error, cbw-timeout and checkpoint go with "
                                         "snapshot true");
        if (es.snapshot && (es.writable || es.persistent))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "a point-in-time view (snapshot) is read-only and not persistent");
        if (checkpoint && !(es.checkpoint = strdup(checkpoint)))
                return -ENOMEM;
        if (bitmap && (!*bitmap || strlen(bitmap) > 1023))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "bitmap must be a name of 1..1023 bytes");
        if (bitmap && es.persistent)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "a persistent export cannot offer a bitmap: the bitmap's point in time "
                                         "would not survive a restart");
        if (bitmap && active->format != DC_FORMAT_QCOW2 && !image_bitmap(active, bitmap))
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound",
                                         "'%s' has no bitmap named '%s' (a raw image has only the transient bitmaps of "
                                         "a live export)", active->path, bitmap);
        if (bitmap && !(es.bitmap = strdup(bitmap)))
                return -ENOMEM;
        if (tcp && (r = export_tcp_check(mgr, tcp, &es.tls, error)) < 0)
                return r;
        if (name && !export_name_valid(name))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "name '%s' must be 1..64 characters of A-Z a-z 0-9 . _ - (not starting with . or -)",
                                         name);
        if (g_hash_table_contains(opts, "max-connections") && (maxc < 1 || maxc > 1024))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "max-connections must be 1..1024");
        if (sock && (sock[0] != '/' || strlen(sock) > 200))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "socket '%s' must be an absolute path of at most 200 bytes", sock);
        r = export_prepare(m, active, layers, &es, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        /* a view beside the chain's live export, which has the plain name */
        es.name = name ? strdup(name) : export_default_name(mgr, active->path, es.snapshot ? "-snapshot" : "");
        if (!es.name)
                return -ENOMEM;
        if (g_hash_table_contains(mgr->exports, es.name))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "an export named '%s' exists already", es.name);
        es.active = strdup(active->path);
        /* 'tcp' alone: no unix socket */
        es.socket = sock ? strdup(sock) : tcp ? NULL : g_build_filename(mgr->config.runtime_dir, "nbd", es.name, NULL);
        es.tcp = tcp ? strdup(tcp) : NULL;
        es.max_connections = (unsigned) maxc;
        if ((r = caller_uid(m, &es.uid)) < 0)
                return r;
        images = paths_joined(es.paths);
        roots = roots_joined(mgr, es.paths);
        r = polkit_verify(mgr, m, "org.diskchain.export",
                          (const char *const[]){ "path", active->path, "root", root_of(mgr, active->path), "operation",
                                                 "export", "name", es.name, "chain", active->path, "images", images,
                                                 "roots", roots, "writable", es.writable ? "true" : "false", "socket",
                                                 es.socket ? es.socket : "", "tcp", es.tcp ? es.tcp : "", "tls",
                                                 es.tls ? "true" : "false", "persistent",
                                                 es.persistent ? "true" : "false", "bitmap", bitmap ? bitmap : "",
                                                 "snapshot", es.snapshot ? "true" : "false", NULL },
                          error);
        if (r <= 0)
                return r < 0 ? r : 1;
        r = export_start(mgr, m, &es, error);
        if (r < 0 || sd_bus_error_is_set(error))
                return r < 0 ? r : -EINVAL;
        return 1;
}

int method_chain_open_nbd(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "writable", NULL };
        Image *active = ACTIVE;
        Manager *mgr = active->mgr;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(mgr, active);
        _cleanup_(export_start_clear) ExportStart es = { .fd = -1, .client_fd = -1 };
        g_autofree char *images = NULL, *roots = NULL;
        bool writable = false;
        Export *e;
        int sv[2], r;

        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        if ((r = opt_bool(opts, "writable", &writable, error)) < 0)
                return r;
        r = export_prepare(m, active, layers, &es, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        e = export_of_path(mgr, active->path);
        if (e && strcmp(e->active, active->path) != 0)
                e = NULL;
        if (e && e->state != EXPORT_LIVE)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "the export '%s' of '%s' is %s", e->name,
                                         active->path, e->state == EXPORT_STARTING ? "starting" : "stopping");
        if (e && writable && !e->writable)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'%s' is exported read-only as '%s': a writable connection needs a writable "
                                         "export",
                                         active->path, e->name);
        images = paths_joined(es.paths);
        roots = roots_joined(mgr, es.paths);
        r = polkit_verify(mgr, m, "org.diskchain.export",
                          (const char *const[]){ "path", active->path, "root", root_of(mgr, active->path), "operation",
                                                 "open-nbd", "name", e ? e->name : "", "chain", active->path, "images",
                                                 images, "roots", roots, "writable",
                                                 (e ? e->writable : writable) ? "true" : "false", NULL },
                          error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                return -errno;
        if (e) {
                r = export_serve_fd(e, sv[1]);
                if (r < 0) {
                        close(sv[0]);
                        return bus_error_from_errno(error, r, dc_get_error());
                }
                r = sd_bus_reply_method_return(m, "h", sv[0]);
                close(sv[0]);
                return r < 0 ? r : 1;
        }
        /* an export of its own, without a socket file, for as long as this connection lasts */
        es.name = export_default_name(mgr, active->path, "");
        if (!es.name) {
                close(sv[0]);
                close(sv[1]);
                return -ENOMEM;
        }
        es.active = strdup(active->path);
        es.writable = writable;
        es.anonymous = true;
        es.max_connections = 1;
        es.fd = sv[1];
        es.client_fd = sv[0];
        (void) caller_uid(m, &es.uid);
        r = export_start(mgr, m, &es, error);
        if (r < 0 || sd_bus_error_is_set(error))
                return r < 0 ? r : -EINVAL;
        return 1;
}
