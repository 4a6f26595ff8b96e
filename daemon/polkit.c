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
 */

#include <errno.h>
#include <stdio.h>

#include "daemon.h"

typedef struct PolkitQuery {
        Manager *mgr;
        sd_bus_message *m;     /* the call being authorized */
        sd_bus_slot *slot;     /* pending CheckAuthorization */
        char *action;
        int verdict;           /* -1 pending, 0 denied, 1 allowed, 2 challenge, 3 error */
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
        free(q);
}

void polkit_registry_free(Manager *mgr) {
        if (mgr->polkit)
                g_hash_table_destroy(mgr->polkit);
        mgr->polkit = NULL;
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

int polkit_verify(Manager *mgr, sd_bus_message *m, const char *action, const char **details, sd_bus_error *error) {
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

        q = calloc(1, sizeof *q);
        if (!q)
                return -ENOMEM;
        q->mgr = mgr;
        q->m = sd_bus_message_ref(m);
        q->action = strdup(action);
        q->verdict = -1;
        r = sd_bus_message_new_method_call(sd_bus_message_get_bus(m), &call, "org.freedesktop.PolicyKit1",
                                           "/org/freedesktop/PolicyKit1/Authority",
                                           "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization");
        if (r >= 0)
                r = sd_bus_message_append(call, "(sa{sv})s", "system-bus-name", 1, "name", "s",
                                          sd_bus_message_get_sender(m), action);
        if (r >= 0)
                r = sd_bus_message_open_container(call, 'a', "{ss}");
        for (const char **d = details; r >= 0 && d && d[0] && d[1]; d += 2)
                r = sd_bus_message_append(call, "{ss}", d[0], d[1]);
        if (r >= 0)
                r = sd_bus_message_close_container(call);
        if (r >= 0)
                r = sd_bus_message_append(call, "us", (uint32_t) !!sd_bus_message_get_allow_interactive_authorization(m),
                                          "");
        if (r >= 0)
                r = sd_bus_call_async(sd_bus_message_get_bus(m), &q->slot, call, on_reply, q, 3600ULL * 1000000ULL);
        sd_bus_message_unref(call);
        if (r < 0) {
                query_free(q);
                return sd_bus_error_set_errnof(error, -r, "cannot ask polkit: %s", strerror(-r));
        }
        g_hash_table_insert(mgr->polkit, m, q);
        return 0;
}

GHashTable *polkit_registry_new(void);
GHashTable *polkit_registry_new(void) {
        return g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, query_free);
}
