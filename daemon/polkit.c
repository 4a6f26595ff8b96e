/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Asynchronous polkit authorization, the way systemd's bus-polkit does it.
 *
 * A method handler calls polkit_verify() before it changes anything.  Root
 * is allowed at once.  Otherwise the first call sends CheckAuthorization to
 * polkitd asynchronously, remembers the query under the message, and
 * returns 0: the handler returns without replying.  When polkitd answers,
 * the verdict is stored and the original message is queued for dispatch
 * again (sd_bus_enqueue_for_read), so the same handler runs a second time
 * and now gets 1 (allowed) or an error.  The message's
 * ALLOW_INTERACTIVE_AUTHORIZATION flag decides whether polkit may ask for a
 * password; a challenge without it becomes InteractiveAuthorizationRequired.
 * With no polkit on the bus only root is allowed.
 *
 * Pending queries are bounded: at most MAX_PENDING in all and
 * MAX_PENDING_PER_CALLER per bus connection (more are refused with
 * LimitsExceeded); polkitd gets 25 s to answer a non-interactive query and
 * five minutes for one that may ask a password.  A query goes away when
 * its call comes back, when the caller leaves the bus (NameOwnerChanged),
 * or, answered but never picked up (the call's object vanished before it
 * was dispatched again), a minute later.
 */

#include <errno.h>
#include <stdio.h>

#include "daemon.h"

#define MAX_PENDING 256
#define MAX_PENDING_PER_CALLER 16
#define TIMEOUT_USEC (25ULL * 1000000ULL)
#define TIMEOUT_INTERACTIVE_USEC (300ULL * 1000000ULL)
#define STALE_USEC (60ULL * 1000000ULL)

typedef struct PolkitQuery {
        Manager *mgr;
        sd_bus_message *m;     /* the call being authorized */
        sd_bus_slot *slot;     /* pending CheckAuthorization */
        char *action, *sender;
        int verdict;           /* -1 pending, 0 denied, 1 allowed, 2 challenge, 3 error */
        uint64_t answered;     /* CLOCK_MONOTONIC µs of the verdict */
        sd_bus_error error;
} PolkitQuery;

static void query_free(void *p) {
        PolkitQuery *q = p;
        if (!q)
                return;
        sd_bus_slot_unref(q->slot);
        sd_bus_message_unref(q->m);
        sd_bus_error_free(&q->error);
        free(q->action);
        free(q->sender);
        free(q);
}

void polkit_free(Manager *mgr) {
        mgr->name_owner_slot = sd_bus_slot_unref(mgr->name_owner_slot);
        if (mgr->polkit)
                g_hash_table_destroy(mgr->polkit);
        mgr->polkit = NULL;
}

static uint64_t now_usec(Manager *mgr) {
        uint64_t t = 0;
        (void) sd_event_now(mgr->event, CLOCK_MONOTONIC, &t);
        return t;
}

/* A caller left the bus: its pending queries have nobody to answer. */
static int on_name_owner_changed(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Manager *mgr = userdata;
        const char *name, *old, *new;
        GHashTableIter it;
        PolkitQuery *q;

        if (sd_bus_message_read(m, "sss", &name, &old, &new) < 0 || *new || name[0] != ':')
                return 0;
        g_hash_table_iter_init(&it, mgr->polkit);
        while (g_hash_table_iter_next(&it, NULL, (void **) &q))
                if (strcmp(q->sender, name) == 0)
                        g_hash_table_iter_remove(&it);
        return 0;
}

int polkit_setup(Manager *mgr) {
        mgr->polkit = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, query_free);
        if (!mgr->bus)
                return 0;
        return sd_bus_match_signal_async(mgr->bus, &mgr->name_owner_slot, "org.freedesktop.DBus",
                                         "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameOwnerChanged",
                                         on_name_owner_changed, NULL, mgr);
}

static int on_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        PolkitQuery *q = userdata;
        const sd_bus_error *e;
        int r;

        q->slot = sd_bus_slot_unref(q->slot);
        e = sd_bus_message_get_error(reply);
        if (e) {
                if (sd_bus_error_has_names(e, SD_BUS_ERROR_SERVICE_UNKNOWN, SD_BUS_ERROR_NAME_HAS_NO_OWNER))
                        q->verdict = 0; /* no polkit: only root, which never gets here */
                else {
                        sd_bus_error_copy(&q->error, e);
                        q->verdict = 3;
                }
        } else {
                int authorized, challenge;
                r = sd_bus_message_enter_container(reply, 'r', "bba{ss}");
                if (r >= 0)
                        r = sd_bus_message_read(reply, "bb", &authorized, &challenge);
                if (r < 0) {
                        sd_bus_error_set(&q->error, SD_BUS_ERROR_FAILED, "invalid reply from polkit");
                        q->verdict = 3;
                } else
                        q->verdict = authorized ? 1 : challenge ? 2 : 0;
        }
        q->answered = now_usec(q->mgr);
        if (q->verdict != 1)
                log_fields(LOG_NOTICE, (const char *const[]){ "DISKCHAIN_ACTION", q->action, "DISKCHAIN_CALLER", q->sender,
                                                              NULL },
                           "polkit refused %s to %s%s%s", q->action, q->sender, q->verdict == 3 ? ": " : "",
                           q->verdict == 3 ? q->error.message : "");
        /* Dispatch the original call again; the handler now finds the verdict. */
        (void) sd_bus_message_rewind(q->m, true);
        r = sd_bus_enqueue_for_read(sd_bus_message_get_bus(q->m), q->m);
        if (r < 0) {
                sd_bus_reply_method_errorf(q->m, SD_BUS_ERROR_FAILED, "cannot requeue the call: %s", strerror(-r));
                g_hash_table_remove(q->mgr->polkit, q->m);
        }
        return 0;
}

static int sender_is_root(sd_bus_message *m) {
        sd_bus_creds *creds = NULL;
        uid_t uid;
        int r;

        r = sd_bus_query_sender_creds(m, SD_BUS_CREDS_EUID, &creds);
        if (r < 0)
                return r;
        r = sd_bus_creds_get_euid(creds, &uid);
        sd_bus_creds_unref(creds);
        if (r < 0)
                return r;
        return uid == 0;
}

int polkit_verify(Manager *mgr, sd_bus_message *m, const char *action, const char *const *details,
                  sd_bus_error *error) {
        const char *object = details && details[0] && details[1] ? details[1] : sd_bus_message_get_path(m);
        sd_bus_message *call = NULL;
        PolkitQuery *q;
        int r;

        r = sender_is_root(m);
        if (r < 0)
                return sd_bus_error_set_errnof(error, -r, "cannot identify the caller: %s", strerror(-r));
        if (r > 0)
                return 1;

        q = g_hash_table_lookup(mgr->polkit, m);
        if (q && q->verdict >= 0 && strcmp(q->action, action) == 0) {
                int verdict = q->verdict;
                if (verdict == 3)
                        sd_bus_error_copy(error, &q->error);
                g_hash_table_remove(mgr->polkit, m);
                switch (verdict) {
                case 1:
                        return 1;
                case 2:
                        if (!sd_bus_message_get_allow_interactive_authorization(m))
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED,
                                                         "'%s': interactive authentication required for %s",
                                                         object, action);
                        _fallthrough_;
                case 0:
                        return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED, "'%s': not authorized for %s",
                                                 object, action);
                default:
                        return -EIO;
                }
        }
        if (q)
                return 0; /* still pending */

        {
                /* answers nobody picked up, and the limits */
                const char *sender = sd_bus_message_get_sender(m);
                uint64_t now = now_usec(mgr);
                unsigned mine = 0;
                GHashTableIter it;
                g_hash_table_iter_init(&it, mgr->polkit);
                while (g_hash_table_iter_next(&it, NULL, (void **) &q)) {
                        if (q->verdict >= 0 && q->answered + STALE_USEC < now) {
                                g_hash_table_iter_remove(&it);
                                continue;
                        }
                        mine += sender && strcmp(q->sender, sender) == 0;
                }
                if (g_hash_table_size(mgr->polkit) >= MAX_PENDING || mine >= MAX_PENDING_PER_CALLER) {
                        log_warning("refusing a call of %s: %u authorizations pending (%u of them its own)",
                                    sender ? sender : "?", g_hash_table_size(mgr->polkit), mine);
                        return sd_bus_error_setf(error, ERROR_PREFIX "LimitsExceeded",
                                                 "'%s': too many authorizations are pending; try again later", object);
                }
        }

        q = calloc(1, sizeof *q);
        if (!q)
                return -ENOMEM;
        q->mgr = mgr;
        q->m = sd_bus_message_ref(m);
        q->action = strdup(action);
        q->sender = strdup(sd_bus_message_get_sender(m) ? sd_bus_message_get_sender(m) : "");
        q->verdict = -1;
        r = sd_bus_message_new_method_call(sd_bus_message_get_bus(m), &call, "org.freedesktop.PolicyKit1",
                                           "/org/freedesktop/PolicyKit1/Authority",
                                           "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization");
        if (r >= 0)
                r = sd_bus_message_append(call, "(sa{sv})s", "system-bus-name", 1, "name", "s",
                                          sd_bus_message_get_sender(m), action);
        if (r >= 0)
                r = sd_bus_message_open_container(call, 'a', "{ss}");
        for (const char *const *d = details; r >= 0 && d && d[0]; d += 2)
                if (d[1])
                        r = sd_bus_message_append(call, "{ss}", d[0], d[1]);
        if (r >= 0)
                r = sd_bus_message_close_container(call);
        if (r >= 0)
                r = sd_bus_message_append(call, "us", (uint32_t) !!sd_bus_message_get_allow_interactive_authorization(m),
                                          "");
        if (r >= 0)
                r = sd_bus_call_async(sd_bus_message_get_bus(m), &q->slot, call, on_reply, q,
                                      sd_bus_message_get_allow_interactive_authorization(m) ? TIMEOUT_INTERACTIVE_USEC
                                                                                           : TIMEOUT_USEC);
        sd_bus_message_unref(call);
        if (r < 0) {
                query_free(q);
                return sd_bus_error_set_errnof(error, -r, "cannot ask polkit: %s", strerror(-r));
        }
        g_hash_table_insert(mgr->polkit, m, q);
        return 0;
}
