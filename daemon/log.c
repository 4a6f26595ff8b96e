/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Logging, as systemd's daemons do it: when stderr is connected to the
 * journal (systemd tells us through $JOURNAL_STREAM), each message goes to
 * the journal with its priority and structured fields (DISKCHAIN_JOB=,
 * DISKCHAIN_IMAGE=, ...), so `journalctl DISKCHAIN_JOB=backup0` finds a
 * job's story.  Without a journal (a shell, the tests), plain lines go to
 * stderr: "diskchaind: <message> [FIELD=value ...]".
 *
 * Any thread may log (the format oracle logs from worker threads).
 */

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>
#include <unistd.h>

#include "daemon.h"

int log_max_level = LOG_INFO;
static bool to_journal;

void log_setup(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        to_journal = e && sscanf(e, "%llu:%llu", &dev, &ino) == 2 && fstat(STDERR_FILENO, &st) == 0 &&
                     (unsigned long long) st.st_dev == dev && (unsigned long long) st.st_ino == ino;
}

void log_fields(int level, const char *const *fields, const char *fmt, ...) {
        char msg[2048];
        va_list ap;

        if (level > log_max_level)
                return;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);

        if (to_journal) {
                struct iovec iov[2 + 2 * 8];
                char *strs[2 + 8] = { NULL };
                size_t n = 0;

                strs[0] = g_strdup_printf("MESSAGE=%s", msg);
                strs[1] = g_strdup_printf("PRIORITY=%d", level);
                for (size_t i = 0; i < 2; i++)
                        iov[n++] = (struct iovec){ strs[i], strlen(strs[i]) };
                for (size_t i = 0; fields && fields[2 * i] && i < 8; i++) {
                        if (!fields[2 * i + 1])
                                continue;
                        strs[2 + i] = g_strdup_printf("%s=%s", fields[2 * i], fields[2 * i + 1]);
                        iov[n++] = (struct iovec){ strs[2 + i], strlen(strs[2 + i]) };
                }
                (void) sd_journal_sendv(iov, (int) n);
                for (size_t i = 0; i < 2 + 8; i++)
                        g_free(strs[i]);
                return;
        }

        {
                GString *line = g_string_new("diskchaind: ");
                bool any = false;

                g_string_append(line, msg);
                for (size_t i = 0; fields && fields[2 * i]; i++) {
                        if (!fields[2 * i + 1])
                                continue;
                        g_string_append_printf(line, "%s%s=%s", any ? " " : " [", fields[2 * i], fields[2 * i + 1]);
                        any = true;
                }
                if (any)
                        g_string_append_c(line, ']');
                g_string_append_c(line, '\n');
                /* one write, so lines of several threads do not interleave */
                (void) !write(STDERR_FILENO, line->str, line->len);
                g_string_free(line, TRUE);
        }
}
