/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Remote targets of Backup and Mirror (NBD URIs, lib/nbd-client.c): whom
 * the daemon connects to on a caller's behalf.
 *
 * Design notes
 * ------------
 * - The daemon runs as root and a caller is any local user polkit let
 *   copy.  An nbd+unix URI names a socket: connected by root, it would
 *   reach sockets the caller cannot (another user's qemu-storage-daemon,
 *   a root-only service that then reads an NBD handshake from root).  So
 *   the daemon connects only to sockets the caller could connect to
 *   themselves: a child process takes the caller's uid, gid and groups,
 *   connects, and hands the connected socket back over a socketpair
 *   (SCM_RIGHTS).  The kernel decides, with the caller's rights, at the
 *   moment of the connect: no check of the path that a symlink swapped in
 *   afterwards could defeat.  Root's own calls connect directly.
 * - TCP URIs (nbd://, nbds://) reach any host the daemon can: that is for
 *   polkit to allow (org.diskchain.copy is auth_admin_keep, and the URI is
 *   the detail "target", so a rule can refuse remote targets or allow one
 *   host).  Nothing else guards them.
 * - TLS credentials are the daemon's, from diskchain.conf ([Remote]
 *   TLSCertificates=, TLSPSKFile=; libnbd's /etc/pki/libnbd otherwise); a
 *   URI's tls-certificates= or tls-psk-file= is refused, since root would
 *   read files of the caller's choice.
 */

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon.h"

static int connect_unix(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd;

        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                int e = errno;
                close(fd);
                return -e;
        }
        return fd;
}

/* The child: become UID, connect PATH, send the socket (or the errno) over SP.  Only system calls. */
_Noreturn static void child_connect(int sp, uid_t uid, gid_t gid, const gid_t *groups, int ngroups, const char *path) {
        char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
        struct msghdr mh = { 0 };
        struct iovec iov;
        int fd, err = 0;

        if (setgroups((size_t) ngroups, groups) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0)
                err = errno;
        fd = err ? -1 : connect_unix(path);
        if (fd < 0 && !err)
                err = -fd;
        iov = (struct iovec){ .iov_base = &err, .iov_len = sizeof err };
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        if (fd >= 0) {
                struct cmsghdr *c;
                mh.msg_control = cbuf;
                mh.msg_controllen = sizeof cbuf;
                c = CMSG_FIRSTHDR(&mh);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(c), &fd, sizeof fd);
        }
        _exit(sendmsg(sp, &mh, MSG_NOSIGNAL) < 0 ? 1 : 0);
}

int remote_connect_unix_as(uid_t uid, const char *path) {
        char cbuf[CMSG_SPACE(sizeof(int))];
        struct passwd pw, *pwp = NULL;
        gid_t groups[256];
        int ngroups = (int) (sizeof groups / sizeof *groups), sp[2], err = 0, fd = -1, r;
        struct msghdr mh = { 0 };
        struct iovec iov = { .iov_base = &err, .iov_len = sizeof err };
        char pwbuf[4096];
        ssize_t n;
        pid_t pid;

        if (uid == 0) {
                fd = connect_unix(path);
                return fd >= 0 ? fd : dc_set_error(-fd, "'%s': cannot connect: %s", path, strerror(-fd));
        }
        if (getpwuid_r(uid, &pw, pwbuf, sizeof pwbuf, &pwp) != 0 || !pwp)
                return dc_set_error(EACCES, "'%s': uid %u has no user entry, so the socket cannot be opened with "
                                            "its rights", path, (unsigned) uid);
        if (getgrouplist(pw.pw_name, pw.pw_gid, groups, &ngroups) < 0)
                return dc_set_error(EACCES, "'%s': user '%s' is in too many groups", path, pw.pw_name);
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) < 0)
                return dc_set_error(errno, "cannot make a socket pair: %m");
        pid = fork();
        if (pid < 0) {
                r = dc_set_error(errno, "cannot fork: %m");
                close(sp[0]);
                close(sp[1]);
                return r;
        }
        if (pid == 0) {
                close(sp[0]);
                child_connect(sp[1], uid, pw.pw_gid, groups, ngroups, path);
        }
        close(sp[1]);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf;
        mh.msg_controllen = sizeof cbuf;
        do
                n = recvmsg(sp[0], &mh, MSG_CMSG_CLOEXEC);
        while (n < 0 && errno == EINTR);
        close(sp[0]);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
        for (struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&mh) : NULL; c; c = CMSG_NXTHDR(&mh, c))
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                        memcpy(&fd, CMSG_DATA(c), sizeof fd);
        if (n != (ssize_t) sizeof err)
                err = EIO;
        if (fd >= 0 && !err)
                return fd;
        if (fd >= 0)
                close(fd);
        if (err == EACCES || err == EPERM)
                return dc_set_error(EACCES, "'%s': user '%s' may not connect to this socket, and the daemon connects "
                                            "only to sockets its caller could", path, pw.pw_name);
        return dc_set_error(err, "'%s': cannot connect as user '%s': %s", path, pw.pw_name, strerror(err));
}
