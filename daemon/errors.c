/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The one table from errno values to the D-Bus errors of api.md. */

#include <errno.h>
#include <string.h>

#include "daemon.h"

int bus_error_from_errno(sd_bus_error *e, int err, const char *message, const char *einval_name) {
        const char *name;

        if (err < 0)
                err = -err;
        switch (err) {
        case EPERM:
                name = ERROR_PREFIX "PathNotAllowed";
                break;
        case ENOENT:
                name = ERROR_PREFIX "NotFound";
                break;
        case EEXIST:
                name = ERROR_PREFIX "Exists";
                break;
        case EBUSY:
        case ETXTBSY:
                name = ERROR_PREFIX "Busy";
                break;
        case ENOTSUP:
        case EROFS:
                name = ERROR_PREFIX "NotSupported";
                break;
        case ENOSPC:
        case EDQUOT:
                name = ERROR_PREFIX "NoSpace";
                break;
        case EFBIG:
        case E2BIG:
        case EMLINK:
                name = ERROR_PREFIX "LimitsExceeded";
                break;
        case ELOOP:
                name = ERROR_PREFIX "Corrupt";
                break;
        case EINVAL:
                name = einval_name ? einval_name : SD_BUS_ERROR_INVALID_ARGS;
                break;
        case EACCES:
                name = SD_BUS_ERROR_ACCESS_DENIED;
                break;
        case ENOMEM:
                name = SD_BUS_ERROR_NO_MEMORY;
                break;
        default:
                name = ERROR_PREFIX "IOError";
                break;
        }
        sd_bus_error_set(e, name, message && *message ? message : strerror(err));
        return -err;
}

int reply_error_errno(sd_bus_message *m, int err, const char *message, const char *einval_name) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        int r;

        bus_error_from_errno(&e, err, message, einval_name);
        r = sd_bus_reply_method_error(m, &e);
        sd_bus_error_free(&e);
        return r;
}

void reply_new_image(Work *w, const char *path) {
        Image *img;

        if (w->r < 0) {
                (void) reply_error_errno(w->m, w->r, w->error, NULL);
                return;
        }
        /* the work rescanned the roots, so the new image is in the model */
        img = model_find(w->mgr, path);
        if (!img) {
                (void) sd_bus_reply_method_errorf(w->m, ERROR_PREFIX "IOError", "'%s' was created but cannot be read back",
                                                  path);
                return;
        }
        (void) sd_bus_reply_method_return(w->m, "o", img->object);
}
