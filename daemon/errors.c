/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The one table from errno values to the D-Bus errors of the API.  The
 * library chooses its errno by the kind of failure (see the conventions in
 * lib/diskchain.h), and the daemon's own checks use the same values, so the
 * same failure reaches a client as the same error whichever layer found it:
 * corrupt metadata is Corrupt (never IOError), a path outside the roots is
 * PathNotAllowed, and only a job verb that the job's status refuses is
 * InvalidJobState.  The message always comes from where the failure was
 * found and names the object and the problem.
 */

#include <errno.h>
#include <string.h>

#include "daemon.h"

static const struct {
        int err;
        const char *name;
} table[] = {
        { ENOENT, ERROR_PREFIX "NotFound" },
        { EEXIST, ERROR_PREFIX "Exists" },
        { EXDEV, ERROR_PREFIX "PathNotAllowed" },
        { EMEDIUMTYPE, ERROR_PREFIX "NotAnImage" },
        { ENOTDIR, ERROR_PREFIX "NotAnImage" },
        { EISDIR, ERROR_PREFIX "NotAnImage" },
        { EBUSY, ERROR_PREFIX "Busy" },
        { ETXTBSY, ERROR_PREFIX "Busy" },
        { ESTALE, ERROR_PREFIX "Busy" },
        { EADDRINUSE, ERROR_PREFIX "Busy" },
        { ENOTSUP, ERROR_PREFIX "NotSupported" },
        { EROFS, ERROR_PREFIX "NotSupported" },
        { EMLINK, ERROR_PREFIX "NotSupported" },
        { EILSEQ, ERROR_PREFIX "NotSupported" },
        { EUCLEAN, ERROR_PREFIX "Corrupt" },
        { ELOOP, ERROR_PREFIX "Corrupt" },
        { ENOSPC, ERROR_PREFIX "NoSpace" },
        { EDQUOT, ERROR_PREFIX "NoSpace" },
        { EFBIG, ERROR_PREFIX "LimitsExceeded" },
        { E2BIG, ERROR_PREFIX "LimitsExceeded" },
        { EOVERFLOW, ERROR_PREFIX "LimitsExceeded" },
        { ENAMETOOLONG, ERROR_PREFIX "LimitsExceeded" },
        { EAGAIN, ERROR_PREFIX "LimitsExceeded" },
        { EPERM, ERROR_PREFIX "InvalidJobState" },
        { EINVAL, SD_BUS_ERROR_INVALID_ARGS },
        { EACCES, SD_BUS_ERROR_ACCESS_DENIED },
        { ENOMEM, SD_BUS_ERROR_NO_MEMORY },
};

const char *bus_error_name(int err) {
        if (err < 0)
                err = -err;
        for (size_t i = 0; i < sizeof table / sizeof *table; i++)
                if (table[i].err == err)
                        return table[i].name;
        return ERROR_PREFIX "IOError";
}

int bus_error_from_errno(sd_bus_error *e, int err, const char *message) {
        if (err < 0)
                err = -err;
        sd_bus_error_set(e, bus_error_name(err), message && *message ? message : strerror(err));
        return -err;
}

int reply_error_errno(sd_bus_message *m, int err, const char *message) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        int r;

        bus_error_from_errno(&e, err, message);
        r = sd_bus_reply_method_error(m, &e);
        sd_bus_error_free(&e);
        return r;
}

void reply_new_image(Work *w, const char *path) {
        Image *img;

        if (w->r < 0) {
                (void) reply_error_errno(w->m, w->r, w->error);
                return;
        }
        /* the work read the new file again, so the model has it */
        img = model_find(w->mgr, path);
        if (!img) {
                Image *bad = g_hash_table_lookup(w->mgr->images, path);
                if (bad && bad->error)
                        (void) reply_error_errno(w->m, bad->error_errno, bad->error);
                else
                        (void) sd_bus_reply_method_errorf(w->m, ERROR_PREFIX "IOError",
                                                          "'%s' was created but cannot be read back", path);
                return;
        }
        (void) sd_bus_reply_method_return(w->m, "o", img->object);
}
