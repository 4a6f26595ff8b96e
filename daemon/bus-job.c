/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * org.diskchain.DiskChain1.Job: the bus glue of one block job (the model is
 * job.c): its object, properties, verbs, query-block-jobs' answer, and the
 * signals that mirror QMP's events one to one.
 *
 * Design notes
 * ------------
 * - Nothing here changes the model except through the library's verbs
 *   (dc_job_pause() ...): a verb's effect comes back as the job's events,
 *   which job.c drains and hands to job_send_event in the order the job
 *   produced them.
 * - job.c announces through the job_send_* functions at the end of this
 *   file and through nothing else, so every signal and PropertiesChanged of
 *   a Job is spelled here.  A status change also refreshes the properties
 *   that follow from it; an error refreshes IoStatus and Error.
 * - Properties read the library's job info at each Get (no copy to keep
 *   current), except Status (the last status event announced, so Get and
 *   the signals agree) and the progress numbers job.c measured.
 */

#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>

#include "daemon.h"

int job_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                    sd_bus_error *error) {
        Manager *mgr = userdata;
        _cleanup_free_ char *id = NULL;
        Job *j;

        if (sd_bus_path_decode(path, JOB_PREFIX, &id) <= 0)
                return 0;
        j = g_hash_table_lookup(mgr->jobs, id);
        if (!j)
                return 0;
        *found = j;
        return 1;
}

int caller_uid(sd_bus_message *m, uid_t *ret) {
        sd_bus_creds *creds = NULL;
        int r = sd_bus_query_sender_creds(m, SD_BUS_CREDS_EUID, &creds);
        if (r >= 0)
                r = sd_bus_creds_get_euid(creds, ret);
        sd_bus_creds_unref(creds);
        return r;
}

static const char *io_status_name(int s) {
        return s == DC_IO_FAILED ? "failed" : s == DC_IO_NOSPACE ? "nospace" : "ok";
}

/* --- events -> signals ------------------------------------------------------ */

void job_send_event(Job *j, const struct dc_job_event *ev) {
        const char *type = dc_job_type_name(j->type);
        Manager *mgr = j->mgr;

        switch (ev->kind) {
        case DC_EV_STATUS:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "JobStatusChange", "ss", j->id,
                                          dc_job_status_name(ev->status));
                (void) sd_bus_emit_properties_changed(mgr->bus, j->object, IFACE_JOB, "Status", "Paused", "Ready",
                                                      "Busy", "IoStatus", "Error", "ActivelySynced", NULL);
                break;
        case DC_EV_READY:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobReady", "ssttt", type, j->id,
                                          ev->len, ev->offset, ev->speed);
                break;
        case DC_EV_PENDING:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobPending", "ss", type, j->id);
                break;
        case DC_EV_COMPLETED:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobCompleted", "ssttts", type, j->id,
                                          ev->len, ev->offset, ev->speed, ev->error);
                break;
        case DC_EV_CANCELLED:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobCancelled", "ssttt", type, j->id,
                                          ev->len, ev->offset, ev->speed);
                break;
        case DC_EV_ERROR:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobError", "sss", j->id,
                                          ev->operation, ev->action);
                (void) sd_bus_emit_properties_changed(mgr->bus, j->object, IFACE_JOB, "IoStatus", "Error", NULL);
                break;
        default:
                break;
        }
}

/* --- query-block-jobs ------------------------------------------------------- */

int append_job_infos(Manager *mgr, sd_bus_message *reply) {
        GHashTableIter it;
        Job *j;
        int r = sd_bus_message_open_container(reply, 'a', "a{sv}");

        g_hash_table_iter_init(&it, mgr->jobs);
        while (r >= 0 && g_hash_table_iter_next(&it, NULL, (void **) &j)) {
                struct dc_job_info i;
                dc_job_get_info(j->dj, &i);
                r = sd_bus_message_open_container(reply, 'a', "{sv}");
                if (r >= 0)
                        r = sd_bus_message_append(
                                reply, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}", "type", "s",
                                dc_job_type_name(j->type), "device", "s", j->id, "len", "t", i.len, "offset", "t",
                                i.offset, "busy", "b", i.busy, "paused", "b", i.paused, "speed", "t", i.speed,
                                "io-status", "s", io_status_name(i.io_status), "ready", "b", i.ready, "status", "s",
                                dc_job_status_name(i.status), "auto-finalize", "b", i.auto_finalize, "auto-dismiss",
                                "b", i.auto_dismiss);
                if (r >= 0 && i.error[0] && (i.status == DC_JOB_CONCLUDED || i.status == DC_JOB_ABORTING))
                        r = sd_bus_message_append(reply, "{sv}", "error", "s", i.error);
                if (r >= 0)
                        r = sd_bus_message_close_container(reply);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

/* --- properties ------------------------------------------------------------- */

#define JOB ((Job *) userdata)

static int property_get_string(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        struct dc_job_info i;
        const char *v = "";

        dc_job_get_info(JOB->dj, &i);
        if (strcmp(prop, "Id") == 0 || strcmp(prop, "Device") == 0)
                v = JOB->id;
        else if (strcmp(prop, "Type") == 0)
                v = dc_job_type_name(JOB->type);
        else if (strcmp(prop, "Status") == 0)
                v = dc_job_status_name(JOB->status);
        else if (strcmp(prop, "Top") == 0)
                v = JOB->top;
        else if (strcmp(prop, "Base") == 0)
                v = JOB->base;
        else if (strcmp(prop, "Target") == 0)
                v = JOB->target;
        else if (strcmp(prop, "IoStatus") == 0)
                v = io_status_name(i.io_status);
        else if (strcmp(prop, "Error") == 0)
                return sd_bus_message_append(reply, "s",
                                             JOB->status == DC_JOB_CONCLUDED || JOB->status == DC_JOB_ABORTING ? i.error
                                                                                                               : "");
        return sd_bus_message_append(reply, "s", v);
}

static int property_get_u64(sd_bus *bus, const char *path, const char *iface, const char *prop,
                            sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        struct dc_job_info i;
        uint64_t v = 0;

        dc_job_get_info(JOB->dj, &i);
        if (strcmp(prop, "CurrentProgress") == 0)
                v = i.offset;
        else if (strcmp(prop, "TotalProgress") == 0)
                v = i.len;
        else if (strcmp(prop, "Speed") == 0)
                v = i.speed;
        return sd_bus_message_append(reply, "t", v);
}

static int property_get_bool(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        struct dc_job_info i;
        bool v = false;

        dc_job_get_info(JOB->dj, &i);
        if (strcmp(prop, "Busy") == 0)
                v = i.busy;
        else if (strcmp(prop, "Paused") == 0)
                v = i.paused;
        else if (strcmp(prop, "Ready") == 0)
                v = i.ready;
        else if (strcmp(prop, "AutoFinalize") == 0)
                v = i.auto_finalize;
        else if (strcmp(prop, "AutoDismiss") == 0)
                v = i.auto_dismiss;
        else if (strcmp(prop, "ActivelySynced") == 0)
                v = i.actively_synced;
        return sd_bus_message_append(reply, "b", v);
}

static int property_get_chain(sd_bus *bus, const char *path, const char *iface, const char *prop,
                              sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "o", JOB->chain_object);
}

static int property_get_uid(sd_bus *bus, const char *path, const char *iface, const char *prop,
                            sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "u", (uint32_t) JOB->uid);
}

/* --- verbs ---------------------------------------------------------------- */

static int verb_authorize(sd_bus_message *m, Job *j, const char *verb, sd_bus_error *error) {
        const char *const d[] = { "path", j->top, "job-id", j->id, "operation", verb, NULL };
        uid_t uid = 0;
        int r = caller_uid(m, &uid);
        if (r < 0)
                return r;
        return polkit_verify(j->mgr, m,
                             uid == j->uid ? "org.diskchain.manage-job" : "org.diskchain.manage-job-other-user", d,
                             error);
}

static int verb_result(sd_bus_message *m, int r, sd_bus_error *error) {
        if (r < 0)
                return bus_error_from_errno(error, r, dc_get_error());
        return sd_bus_reply_method_return(m, NULL);
}

#define VERB_METHOD(name, verb, call)                                                         \
        static int method_##name(sd_bus_message *m, void *userdata, sd_bus_error *error) {    \
                int r = verb_authorize(m, JOB, verb, error);                                  \
                if (r <= 0)                                                                   \
                        return r < 0 ? r : 1;                                                 \
                return verb_result(m, call, error);                                           \
        }

VERB_METHOD(pause, "pause", dc_job_pause(JOB->dj))
VERB_METHOD(resume, "resume", dc_job_resume(JOB->dj))
VERB_METHOD(complete, "complete", dc_job_complete(JOB->dj))
VERB_METHOD(finalize, "finalize", dc_job_finalize(JOB->dj))
VERB_METHOD(dismiss, "dismiss", dc_job_dismiss(JOB->dj))

static int method_set_speed(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        uint64_t speed;
        int r = sd_bus_message_read(m, "t", &speed);
        if (r < 0)
                return r;
        r = verb_authorize(m, JOB, "set-speed", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        r = dc_job_set_speed(JOB->dj, speed);
        if (r >= 0)
                (void) sd_bus_emit_properties_changed(JOB->mgr->bus, JOB->object, IFACE_JOB, "Speed", NULL);
        return verb_result(m, r, error);
}

static int method_cancel(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        int force;
        int r = sd_bus_message_read(m, "b", &force);
        if (r < 0)
                return r;
        r = verb_authorize(m, JOB, "cancel", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        return verb_result(m, dc_job_cancel(JOB->dj, force), error);
}

static int method_change(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "copy-mode", NULL };
        static const char *const copy_modes[] = { "background", "write-blocking", NULL };
        g_autoptr(GHashTable) opts = NULL;
        int mode = -1;
        int r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        r = opt_enum(opts, "copy-mode", copy_modes, &mode, error);
        if (r < 0)
                return r;
        r = verb_authorize(m, JOB, "change", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (JOB->type != DC_JOB_TYPE_MIRROR)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "Job '%s' of type '%s' has no options to change", JOB->id,
                                         dc_job_type_name(JOB->type));
        if (mode < 0)
                return sd_bus_reply_method_return(m, NULL); /* nothing asked */
        r = dc_job_change_copy_mode(JOB->dj, mode ? DC_COPY_MODE_WRITE_BLOCKING : DC_COPY_MODE_BACKGROUND);
        if (r == -EINVAL)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, dc_get_error());
        return verb_result(m, r, error);
}

#define JPROP(name, sig, getter) SD_BUS_PROPERTY(name, sig, getter, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE)

const sd_bus_vtable job_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Id", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Type", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        JPROP("Status", "s", property_get_string),
        SD_BUS_PROPERTY("Device", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Chain", "o", property_get_chain, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Top", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Base", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Target", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        JPROP("CurrentProgress", "t", property_get_u64),
        JPROP("TotalProgress", "t", property_get_u64),
        JPROP("Speed", "t", property_get_u64),
        JPROP("Busy", "b", property_get_bool),
        JPROP("Paused", "b", property_get_bool),
        JPROP("Ready", "b", property_get_bool),
        JPROP("IoStatus", "s", property_get_string),
        JPROP("Error", "s", property_get_string),
        SD_BUS_PROPERTY("AutoFinalize", "b", property_get_bool, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("AutoDismiss", "b", property_get_bool, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        JPROP("ActivelySynced", "b", property_get_bool),
        SD_BUS_PROPERTY("StartedByUID", "u", property_get_uid, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("StartTime", "t", NULL, offsetof(Job, start_time), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Rate", "t", NULL, offsetof(Job, rate.rate), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ExpectedEndTime", "t", NULL, offsetof(Job, expected_end),
                        SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD("Pause", NULL, NULL, method_pause, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Resume", NULL, NULL, method_resume, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetSpeed", SD_BUS_ARGS("t", speed), SD_BUS_NO_RESULT, method_set_speed,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Change", SD_BUS_ARGS("a{sv}", options), SD_BUS_NO_RESULT, method_change,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Complete", NULL, NULL, method_complete, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Cancel", SD_BUS_ARGS("b", force), SD_BUS_NO_RESULT, method_cancel,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Finalize", NULL, NULL, method_finalize, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Dismiss", NULL, NULL, method_dismiss, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_ARGS("JobStatusChange", SD_BUS_ARGS("s", id, "s", status), 0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobReady", SD_BUS_ARGS("s", type, "s", device, "t", len, "t", offset, "t", speed),
                                0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobPending", SD_BUS_ARGS("s", type, "s", id), 0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobCompleted",
                                SD_BUS_ARGS("s", type, "s", device, "t", len, "t", offset, "t", speed, "s", error), 0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobCancelled",
                                SD_BUS_ARGS("s", type, "s", device, "t", len, "t", offset, "t", speed), 0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobError", SD_BUS_ARGS("s", device, "s", operation, "s", action), 0),
        SD_BUS_VTABLE_END,
};

/* --- the model's announcements ------------------------------------------------ */

void job_send_changed(Job *j, char **props) {
        (void) sd_bus_emit_properties_changed_strv(j->mgr->bus, j->object, IFACE_JOB, props);
}

void job_send_added(Job *j) {
        (void) sd_bus_emit_object_added(j->mgr->bus, j->object);
        (void) sd_bus_emit_properties_changed(j->mgr->bus, j->chain_object, IFACE_CHAIN, "Jobs", NULL);
}

void job_send_removed(Job *j) {
        (void) sd_bus_emit_object_removed(j->mgr->bus, j->object);
        (void) sd_bus_emit_properties_changed(j->mgr->bus, j->chain_object, IFACE_CHAIN, "Jobs", NULL);
}
