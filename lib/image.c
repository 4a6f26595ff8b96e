/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Images and chains: confinement to the storage roots, opening a chain,
 * the public entry points, chain reads, block status and map.
 *
 * Design notes
 * ------------
 * - Every path is normalised lexically and must lie strictly inside one
 *   storage root; the file is then opened with openat2(RESOLVE_BENEATH |
 *   RESOLVE_NO_MAGICLINKS) relative to that root, so a symlink that leads
 *   out of the root fails in the kernel, not in a check that races.
 * - Backing names are resolved against the directory of the overlay (not
 *   the CWD), as QEMU does; protocol names (nbd://, json:) are refused.
 *   The backing format comes from the header extension, otherwise qcow2 is
 *   recognised by its magic and anything else is raw.
 * - Chains are limited in depth and loops are caught by (st_dev, st_ino).
 * - Locking follows QEMU's file-posix scheme of OFD byte locks (bytes 100+n
 *   "I use permission n", 200+n "nobody else may have permission n"), so
 *   that QEMU and diskchain refuse to write the same file at once.
 */

#include <fcntl.h>
#include <libgen.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#include "dc-internal.h"

/* --- paths ---------------------------------------------------------------- */

char *dc_path_normalize(const char *abs) {
        size_t n = strlen(abs);
        char *out = malloc(n + 2), *tmp = strdup(abs), *save = NULL;
        size_t len = 0;

        if (!out || !tmp) {
                free(out);
                free(tmp);
                return NULL;
        }
        out[0] = 0;
        for (char *tok = strtok_r(tmp, "/", &save); tok; tok = strtok_r(NULL, "/", &save)) {
                if (strcmp(tok, ".") == 0)
                        continue;
                if (strcmp(tok, "..") == 0) {
                        char *slash = strrchr(out, '/');
                        len = slash ? (size_t) (slash - out) : 0;
                        out[len] = 0;
                        continue;
                }
                out[len++] = '/';
                memcpy(out + len, tok, strlen(tok));
                len += strlen(tok);
                out[len] = 0;
        }
        if (len == 0)
                strcpy(out, "/");
        free(tmp);
        return out;
}

static int find_root(const char *abs, const char *const *roots, size_t *ret_idx, size_t *ret_len) {
        for (size_t i = 0; roots && roots[i]; i++) {
                _cleanup_free_ char *r = dc_path_normalize(roots[i]);
                size_t l;
                if (!r)
                        return -ENOMEM;
                l = strcmp(r, "/") == 0 ? 0 : strlen(r);
                if (strncmp(abs, r, l) == 0 && abs[l] == '/' && abs[l + 1]) {
                        *ret_idx = i;
                        *ret_len = l;
                        return 0;
                }
        }
        return -EXDEV;
}

DC_EXPORT int dc_path_resolve(const char *path, const char *const *roots, char **ret_abs, size_t *ret_root_index) {
        _cleanup_free_ char *joined = NULL;
        char *abs;
        size_t idx, l;

        if (!path || !*path)
                return dc_error(EINVAL, "empty path");
        if (strlen(path) >= 4096)
                return dc_error(ENAMETOOLONG, "path is too long");
        /* Paths travel in polkit details, logs and lists one per line:
         * a control character in one is refused rather than escaped. */
        for (const char *c = path; *c; c++)
                if ((unsigned char) *c < 0x20 || *c == 0x7f)
                        return dc_error(EINVAL, "path '%.*s...' contains a control character", (int) (c - path),
                                        path);
        if (path[0] != '/') {
                char cwd[4096];
                const char *base = roots && roots[0] ? roots[0] : getcwd(cwd, sizeof cwd);
                if (!base)
                        return dc_error(errno, "'%s': cannot get the working directory: %m", path);
                if (asprintf(&joined, "%s/%s", base, path) < 0)
                        return dc_error(ENOMEM, "out of memory");
                path = joined;
        }
        abs = dc_path_normalize(path);
        if (!abs)
                return dc_error(ENOMEM, "out of memory");
        if (roots && find_root(abs, roots, &idx, &l) < 0) {
                dc_error(EXDEV, "'%s' is outside the storage roots", abs);
                free(abs);
                return -EXDEV;
        }
        *ret_abs = abs;
        if (ret_root_index)
                *ret_root_index = roots ? idx : 0;
        return 0;
}

/* The directory of ABS's storage root, opened by its configured path (which we trust). */
static int open_root(const char *abs, const char *const *roots, char **ret_root, size_t *ret_len) {
        _cleanup_free_ char *root = NULL;
        size_t idx, l;
        int dfd;

        if (find_root(abs, roots, &idx, &l) < 0)
                return dc_error(EXDEV, "'%s' is outside the storage roots", abs);
        root = strndup(abs, l);
        if (!root)
                return dc_error(ENOMEM, "out of memory");
        dfd = open(l ? root : "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return dc_error(errno, "storage root '%s': %m", l ? root : "/");
        *ret_root = TAKE_PTR(root);
        *ret_len = l;
        return dfd;
}

/* openat2() beneath DFD (the root) with no symlink anywhere in REL. */
static int open_beneath(int dfd, const char *abs, const char *rel, const char *root, int flags, mode_t mode) {
        struct open_how how = { 0 };
        int fd;

        /* openat2() takes no flag besides O_DIRECTORY, O_NOFOLLOW and O_CLOEXEC with O_PATH */
        how.flags = (uint64_t) (flags | O_CLOEXEC | ((flags & O_PATH) ? 0 : O_NOCTTY));
        how.mode = (flags & O_CREAT) ? mode : 0;
        how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
        fd = (int) syscall(SYS_openat2, dfd, rel, &how, sizeof how);
        if (fd < 0 && errno == ENOSYS) {
                /* Old kernel: the last component at least is no symlink, and
                 * the whole path must be what it says. */
                fd = openat(dfd, rel, flags | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW, mode);
                if (fd >= 0) {
                        char real[4096];
                        if (!realpath(abs, real) || strcmp(real, abs) != 0) {
                                close(fd);
                                return dc_error(EXDEV, "'%s': the path goes through a symlink", abs);
                        }
                }
        }
        if (fd < 0) {
                if (errno == EXDEV)
                        return dc_error(EXDEV, "'%s' leads outside the storage root '%s'", abs, root);
                if (errno == ELOOP)
                        return dc_error(EXDEV, "'%s': the path goes through a symlink, and symlinks inside the "
                                               "storage roots are not followed", abs);
                return dc_error(errno, "'%s': %m", abs);
        }
        return fd;
}

DC_EXPORT int dc_path_open(const char *abs, const char *const *roots, int flags, mode_t mode) {
        _cleanup_close_ int dfd = -EBADF;
        _cleanup_free_ char *root = NULL;
        bool file = !(flags & (O_PATH | O_DIRECTORY));
        struct stat st;
        size_t l;
        int fd;

        /* Opening a FIFO for reading would block until a writer comes: never wait.
         * Reading an image leaves its access time alone (a scan would otherwise
         * change what it watches); without the right to, the open goes on without. */
        if (file)
                flags |= O_NONBLOCK;
        if (file && (flags & O_ACCMODE) == O_RDONLY && !(flags & O_CREAT))
                flags |= O_NOATIME;
        for (;;) {
                if (!roots) {
                        fd = open(abs, flags | O_CLOEXEC | O_NOCTTY | O_NOFOLLOW, mode);
                        if (fd < 0 && errno == EPERM && (flags & O_NOATIME)) {
                                flags &= ~O_NOATIME;
                                continue;
                        }
                        if (fd < 0)
                                return dc_error(errno == ELOOP ? EXDEV : errno, "'%s': %m", abs);
                } else {
                        if (dfd < 0) {
                                dfd = open_root(abs, roots, &root, &l);
                                if (dfd < 0)
                                        return dfd;
                        }
                        fd = open_beneath(dfd, abs, abs + l + 1, root, flags, mode);
                        if (fd == -EPERM && (flags & O_NOATIME)) {
                                flags &= ~O_NOATIME;
                                continue;
                        }
                        if (fd < 0)
                                return fd;
                }
                break;
        }
        if (file && fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
                (void) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
        return fd;
}

/* The directory holding ABS, opened beneath the root (the root itself when ABS is directly in it). */
static int open_parent(const char *abs, const char *const *roots, const char **ret_name) {
        _cleanup_free_ char *root = NULL, *dir = NULL;
        _cleanup_close_ int dfd = -EBADF;
        const char *slash = strrchr(abs, '/');
        size_t l;

        if (!roots || !slash)
                return dc_error(EXDEV, "'%s': no storage root to resolve it beneath", abs);
        dfd = open_root(abs, roots, &root, &l);
        if (dfd < 0)
                return dfd;
        *ret_name = slash + 1;
        if ((size_t) (slash - abs) == l)
                return TAKE_FD(dfd);
        dir = strndup(abs, (size_t) (slash - abs));
        if (!dir)
                return dc_error(ENOMEM, "out of memory");
        return open_beneath(dfd, dir, dir + l + 1, root, O_PATH | O_DIRECTORY, 0);
}

DC_EXPORT int dc_path_unlink(const char *abs, const char *const *roots, const struct stat *expect) {
        _cleanup_close_ int dfd = -EBADF;
        const char *name = NULL;
        struct stat st;

        dfd = open_parent(abs, roots, &name);
        if (dfd < 0)
                return dfd;
        if (expect) {
                if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                        return dc_error(errno, "'%s': %m", abs);
                if (st.st_dev != expect->st_dev || st.st_ino != expect->st_ino)
                        return dc_error(ESTALE, "'%s' was replaced by another file: not removed", abs);
        }
        if (unlinkat(dfd, name, 0) < 0)
                return dc_error(errno, "'%s': cannot remove: %m", abs);
        return 0;
}

DC_EXPORT int dc_backing_resolve(const char *overlay_abs, const char *backing, char **ret_abs) {
        _cleanup_free_ char *dir = NULL, *joined = NULL;
        char *abs;

        if (strstr(backing, "://") || strncmp(backing, "json:", 5) == 0 || strncmp(backing, "nbd:", 4) == 0)
                return dc_error(EXDEV, "'%s': backing file '%s' is a protocol name, not a file", overlay_abs,
                                backing);
        if (backing[0] == '/')
                abs = dc_path_normalize(backing);
        else {
                dir = strdup(overlay_abs);
                if (!dir)
                        return dc_error(ENOMEM, "out of memory");
                if (asprintf(&joined, "%s/%s", dirname(dir), backing) < 0)
                        return dc_error(ENOMEM, "out of memory");
                abs = dc_path_normalize(joined);
        }
        if (!abs)
                return dc_error(ENOMEM, "out of memory");
        *ret_abs = abs;
        return 0;
}

/* --- QEMU-compatible locks -------------------------------------------------- */

#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200
#define PERM_CONSISTENT_READ 0
#define PERM_WRITE 1

static int lock_test(int fd, off_t byte) {
        struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
        if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
                return -errno;
        return fl.l_type != F_UNLCK;
}

static int lock_take(int fd, off_t byte) {
        struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
        if (fcntl(fd, F_OFD_SETLK, &fl) < 0)
                return -errno;
        return 0;
}

int dc_lock_fd(int fd, const char *path, bool writable) {
        int r;

        /* A writer needs nobody else writing and nobody refusing writers;
         * a reader needs nobody writing (it refuses writers, as QEMU's
         * backing files and read-only opens do). */
        r = lock_test(fd, LOCK_PERM_BASE + PERM_WRITE);
        if (r == 0 && writable)
                r = lock_test(fd, LOCK_SHARED_BASE + PERM_WRITE);
        if (r > 0)
                return dc_error(EBUSY, "'%s' is in use by another process that holds a conflicting lock", path);
        if (r < 0)
                return 0; /* no OFD locks on this file system: nothing to respect */
        (void) lock_take(fd, LOCK_PERM_BASE + PERM_CONSISTENT_READ);
        if (writable)
                (void) lock_take(fd, LOCK_PERM_BASE + PERM_WRITE);
        (void) lock_take(fd, LOCK_SHARED_BASE + PERM_WRITE);
        return 0;
}

DC_EXPORT int dc_fd_locked_by_writer(int fd) {
        int r = lock_test(fd, LOCK_PERM_BASE + PERM_WRITE);
        return r < 0 ? 0 : r;
}

/* --- formats -------------------------------------------------------------------- */

DC_EXPORT const char *dc_probe_magic(const uint8_t *b, size_t len) {
        static const struct {
                const char *name;
                size_t off;
                const char *magic;
                size_t len;
        } magics[] = {
                /* the first bytes QEMU's probe functions look for */
                { "qcow2", 0, "QFI\xfb", 4 },
                { "qed", 0, "QED\0", 4 },
                { "vmdk", 0, "KDMV", 4 },
                { "vmdk", 0, "COWD", 4 },
                { "vmdk", 0, "# Disk DescriptorFile", 21 },
                { "vdi", 0x40, "\x7f\x10\xda\xbe", 4 },
                { "vhdx", 0, "vhdxfile", 8 },
                { "vpc", 0, "conectix", 8 },
                { "luks", 0, "LUKS\xba\xbe", 6 },
                { "parallels", 0, "WithoutFreeSpace", 16 },
                { "parallels", 0, "WithouFreSpacExt", 16 },
                { "bochs", 0, "Bochs Virtual HD Image", 22 },
                { "cloop", 0, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0", 45 },
        };
        for (size_t i = 0; i < sizeof magics / sizeof *magics; i++)
                if (len >= magics[i].off + magics[i].len && memcmp(b + magics[i].off, magics[i].magic, magics[i].len) == 0)
                        return magics[i].name;
        return NULL;
}

static int format_from_name(const char *abs, const char *name) {
        if (!name)
                return -1;
        if (strcmp(name, "qcow2") == 0)
                return DC_FORMAT_QCOW2;
        if (strcmp(name, "raw") == 0)
                return DC_FORMAT_RAW;
        return dc_error(ENOTSUP, "'%s': backing format '%s' is not supported", abs, name);
}

/* Without an oracle: the overlay's word, else the content (tools on their user's own files). */
static int format_probe(const char *abs, int fd, int hint, int *ret) {
        uint8_t magic[4] = { 0 };
        int r;

        if (hint >= 0) {
                *ret = hint;
                return 0;
        }
        r = dc_pread_full(fd, magic, sizeof magic, 0);
        if (r < 0)
                return dc_error(r, "'%s': cannot read: %s", abs, strerror(-r));
        *ret = be32(magic) == 0x514649fbu ? DC_FORMAT_QCOW2 : DC_FORMAT_RAW;
        return 0;
}

/* --- open / close --------------------------------------------------------- */

static dc_image *layer_free(dc_image *img) {
        if (!img)
                return NULL;
        if (img->drv && img->drv->close)
                img->drv->close(img);
        if (img->fd >= 0)
                close(img->fd);
        if (img->dfd >= 0)
                close(img->dfd);
        pthread_mutex_destroy(&img->lock);
        free(img->path);
        dc_strv_free(img->roots);
        free(img->read_only_reason);
        free(img->backing_file);
        free(img->backing_format);
        free(img);
        return NULL;
}

DC_EXPORT dc_image *dc_image_close(dc_image *img) {
        while (img) {
                dc_image *next = img->backing;
                layer_free(img);
                img = next;
        }
        return NULL;
}

static void dc_image_closep(dc_image **p) {
        dc_image_close(*p);
}

/* Open one layer.  HINT is the format the overlay's backing-format field names (-1: none). */
static int layer_open(const char *abs, const struct dc_open_options *o, bool writable, int hint, dc_image **ret) {
        dc_image *img;
        struct stat st;
        int format, r;

        img = calloc(1, sizeof *img);
        if (!img)
                return dc_error(ENOMEM, "out of memory");
        pthread_mutex_init(&img->lock, NULL);
        img->fd = -EBADF;
        img->dfd = -EBADF;
        img->check_mode = o->check_mode;
        img->no_lock = o->no_lock;
        img->path = strdup(abs);
        img->roots = dc_strv_copy(o->roots);
        if (!img->path || (o->roots && !img->roots)) {
                layer_free(img);
                return dc_error(ENOMEM, "out of memory");
        }
        r = dc_path_open(abs, o->roots, writable ? O_RDWR : O_RDONLY, 0);
        if (r < 0 && r == -EROFS && writable) {
                layer_free(img);
                return dc_error(EROFS, "'%s' is on a read-only file system", abs);
        }
        if (r < 0) {
                layer_free(img);
                return r;
        }
        img->fd = r;
        if (fstat(img->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                layer_free(img);
                return dc_error(EMEDIUMTYPE, "'%s' is not a regular file", abs);
        }
        if (writable && o->roots && st.st_nlink > 1) {
                layer_free(img);
                return dc_error(EMLINK, "'%s' has %ju hard links; diskchain writes only images with one link, so that "
                                        "a link in a storage root cannot be used to write a file elsewhere",
                                abs, (uintmax_t) st.st_nlink);
        }
        if (o->oracle)
                r = o->oracle->format(o->oracle->userdata, abs, img->fd, hint, &format);
        else
                r = format_probe(abs, img->fd, hint, &format);
        if (r < 0) {
                layer_free(img);
                return r;
        }
        img->drv = format == DC_FORMAT_QCOW2 ? &dc_qcow2_driver : &dc_raw_driver;
        if (format == DC_FORMAT_QCOW2) {
                uint8_t magic[4] = { 0 };
                r = dc_pread_full(img->fd, magic, sizeof magic, 0);
                if (r >= 0 && be32(magic) != 0x514649fbu)
                        r = dc_error(EMEDIUMTYPE, "'%s' is not a qcow2 image (no qcow2 header)", abs);
                else if (r < 0)
                        r = dc_error(r, "'%s': cannot read: %s", abs, strerror(-r));
                if (r < 0) {
                        layer_free(img);
                        return r;
                }
        }
        if (!o->no_lock) {
                r = dc_lock_fd(img->fd, img->path, writable);
                if (r < 0) {
                        layer_free(img);
                        return r;
                }
        }
        r = img->drv->open(img, writable);
        if (r < 0) {
                layer_free(img);
                return r;
        }
        img->writable = writable && !img->read_only_reason;
        *ret = img;
        return 0;
}

/* After LEN more bytes of buffered job data: every KICK bytes (read under the image lock), start writing
 * them and drop what is written. */
static void writeback_account(dc_image *img, size_t len, uint64_t kick) {
        uint64_t before = __atomic_fetch_add(&img->wb_bytes, len, __ATOMIC_RELAXED);

        /* the kick's size and why it is there: dc_image_job_cache (block-copy.c) */
        if (!kick || before / kick == (before + len) / kick)
                return;
        /* errors are the final flush's to report: this only starts the work early */
        (void) posix_fadvise(img->fd, 0, 0, POSIX_FADV_DONTNEED);
        (void) sync_file_range(img->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
}

/*
 * The O_DIRECT twin of the image's descriptor, opened (the image lock held)
 * through /proc/self/fd so that no path is resolved again, read-write when
 * the image is: a second descriptor on the same file, which the kernel
 * keeps coherent with the buffered one (a direct read writes the dirty
 * pages of its range back first, a direct write drops the cached ones).
 * False where the file system has no direct I/O (tmpfs) or tells no
 * alignment.  Once open it stays to the close: a read or a write without
 * the lock may be using it.
 */
bool dc_image_direct_twin(dc_image *img) {
        struct statx sx;
        char p[64];

        if (img->dfd >= 0)
                return true;
        if (img->fd < 0 || statx(img->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) < 0 ||
            !(sx.stx_mask & STATX_DIOALIGN) || !sx.stx_dio_offset_align || !sx.stx_dio_mem_align)
                return false;
        snprintf(p, sizeof p, "/proc/self/fd/%d", img->fd);
        img->dio_mem_align = sx.stx_dio_mem_align;
        img->dio_off_align = sx.stx_dio_offset_align;
        img->dfd = open(p, (img->writable ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC | O_NOCTTY);
        return img->dfd >= 0;
}

/*
 * The disk's cache mode for one layer (QEMU's cache=none when ON): whole,
 * aligned data reads and writes go around the page cache, through the
 * twin; metadata and unaligned pieces stay buffered.  Nothing changes
 * where the file system has no direct I/O.
 */
void dc_image_cache_none(dc_image *img, bool on) {
        pthread_mutex_lock(&img->lock);
        on = on && dc_image_direct_twin(img);
        __atomic_store_n(&img->cache_none, on, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&img->lock);
}

static bool direct_fits(dc_image *img, const void *buf, size_t len, uint64_t off) {
        return (uintptr_t) buf % img->dio_mem_align == 0 && off % img->dio_off_align == 0 &&
               len % img->dio_off_align == 0;
}

/* The descriptor a read of LEN bytes of data at OFF into BUF takes: around the cache when the disk's mode says so and they fit. */
int dc_image_data_fd(dc_image *img, const void *buf, size_t len, uint64_t off) {
        bool direct = __atomic_load_n(&img->cache_none, __ATOMIC_ACQUIRE) && direct_fits(img, buf, len, off);
        return direct ? img->dfd : img->fd;
}

/* Read LEN bytes of data at OFF from the image's file (dc_image_data_fd). */
int dc_image_pread_data(dc_image *img, void *buf, size_t len, uint64_t off) {
        int fd = dc_image_data_fd(img, buf, len, off);
        int r = dc_pread_full(fd, buf, len, off);

        if (r == -EINVAL && fd != img->fd)
                /* a rule the statx did not tell, or a short read at the end of the file */
                r = dc_pread_full(img->fd, buf, len, off);
        return r;
}

/*
 * Write LEN bytes of data at OFF, the image lock held: directly when direct
 * writes are on (a job's cache=none, or the disk's) and BUF, OFF and LEN
 * suit the device, else through the cache.  UNLOCKED releases the lock for
 * the write itself (the caller made sure that nobody else touches those
 * bytes meanwhile).
 */
int dc_image_pwrite_data(dc_image *img, const void *buf, size_t len, uint64_t off, bool unlocked) {
        bool direct = (img->direct || img->cache_none) && direct_fits(img, buf, len, off);
        bool writeback = img->writeback;
        uint64_t kick = img->wb_kick; /* the job may end (dc_image_job_cache) while the lock is released */
        int r;

        if (unlocked)
                pthread_mutex_unlock(&img->lock);
        r = dc_pwrite_full(direct ? img->dfd : img->fd, buf, len, off);
        if (r == -EINVAL && direct)
                r = dc_pwrite_full(img->fd, buf, len, off);
        else
                direct = false;
        if (r >= 0 && writeback)
                writeback_account(img, len, kick);
        if (unlocked)
                pthread_mutex_lock(&img->lock);
        if (direct && r >= 0) {
                /* refused after all (a rule the statx did not tell): cached from now on */
                img->direct = false;
                __atomic_store_n(&img->cache_none, false, __ATOMIC_RELEASE);
        }
        return r;
}

/* A buffer for job data, aligned for direct I/O on any device. */
void *dc_io_buffer(size_t len) {
        void *p;
        return posix_memalign(&p, 4096, ALIGN_UP(MAX(len, (size_t) 1), 4096)) == 0 ? p : NULL;
}

/* Is ABS one of the layers the caller wants read-write besides the top? */
static bool wants_writable(const struct dc_open_options *o, const char *abs) {
        if (o->writable_layer && strcmp(o->writable_layer, abs) == 0)
                return true;
        for (size_t i = 0; o->writable_layers && o->writable_layers[i]; i++)
                if (strcmp(o->writable_layers[i], abs) == 0)
                        return true;
        return false;
}

DC_EXPORT int dc_image_open(const char *path, const struct dc_open_options *opts, dc_image **ret) {
        static const struct dc_open_options defaults = { 0 };
        const struct dc_open_options *o = opts ? opts : &defaults;
        unsigned max_depth = o->max_depth ? o->max_depth : DC_DEFAULT_MAX_DEPTH;
        _cleanup_(dc_image_closep) dc_image *top = NULL;
        _cleanup_free_ char *abs = NULL;
        struct {
                dev_t dev;
                ino_t ino;
        } seen[256];
        unsigned depth = 0;
        dc_image *cur;
        struct stat st;
        int r;

        dc_error_clear();
        if (max_depth > 255)
                max_depth = 255;
        r = dc_path_resolve(path, o->roots, &abs, NULL);
        if (r < 0)
                return r;
        r = layer_open(abs, o, o->writable || wants_writable(o, abs), -1, &top);
        if (r < 0)
                return r;
        cur = top;
        for (;;) {
                _cleanup_free_ char *babs = NULL;
                int fmt;

                if (fstat(cur->fd, &st) < 0)
                        return dc_error(errno, "'%s': cannot stat: %m", cur->path);
                for (unsigned i = 0; i < depth; i++)
                        if (seen[i].dev == st.st_dev && seen[i].ino == st.st_ino)
                                return dc_error(ELOOP, "'%s': backing chain loops back to '%s'", abs, cur->path);
                seen[depth].dev = st.st_dev;
                seen[depth].ino = st.st_ino;
                depth++;
                if (!cur->backing_file || o->no_backing)
                        break;
                if (depth >= max_depth)
                        return dc_error(EFBIG, "'%s': backing chain is deeper than %u", abs, max_depth);
                r = dc_backing_resolve(cur->path, cur->backing_file, &babs);
                if (r < 0)
                        return r;
                if (o->roots) {
                        size_t idx, l;
                        if (find_root(babs, o->roots, &idx, &l) < 0)
                                return dc_error(EXDEV, "'%s': backing file '%s' is outside the storage roots",
                                                cur->path, cur->backing_file);
                }
                fmt = format_from_name(cur->path, cur->backing_format);
                if (fmt < -1)
                        return fmt;
                r = layer_open(babs, o, wants_writable(o, babs), fmt, &cur->backing);
                if (r < 0) {
                        if (r == -ENOENT)
                                return dc_error(ENOENT, "'%s': backing file '%s' does not exist", cur->path,
                                                cur->backing_file);
                        return r;
                }
                cur = cur->backing;
        }
        *ret = TAKE_PTR(top);
        return 0;
}

/* --- I/O ------------------------------------------------------------------ */

static int check_range(dc_image *img, uint64_t off, uint64_t len) {
        if (off > img->virtual_size || len > img->virtual_size - off)
                return dc_error(EINVAL, "'%s': range %llu+%llu is beyond the virtual size %llu", img->path,
                                (unsigned long long) off, (unsigned long long) len,
                                (unsigned long long) img->virtual_size);
        return 0;
}

static int check_writable(dc_image *img) {
        if (!img->writable)
                return dc_error(EROFS, "'%s' is open read-only%s%s", img->path, img->read_only_reason ? ": " : "",
                                img->read_only_reason ? img->read_only_reason : "");
        return 0;
}

/*
 * The layer's lock is held to find where each piece lies, and released
 * while the data is read (by host offset, where the driver can) and while
 * the layer below is read: copies of a job run side by side on one chain
 * and would otherwise wait for each other's reads, one request on the disk
 * at a time.  What makes that safe is the same as in QEMU's qcow2 reads,
 * which drop the image lock for the data too: a host cluster read here
 * changes hands only when the guest range it holds is written, zeroed or
 * discarded, and every write of a job or guest takes the disk's range lock
 * over its range, as a job's copy does over what it reads (a guest read
 * racing its own write of the same range sees old or new data, as on any
 * disk; one racing a discard and a reallocation in between may see what the
 * cluster holds next, as in QEMU).  The backing pointers change only with
 * the disk quiesced, and never under a job's own copy.
 */
int dc_chain_read(dc_image *img, void *buf, uint64_t off, size_t len) {
        uint8_t *p = buf;
        int r = 0;

        while (len > 0) {
                struct dc_layer_status st;
                dc_image *below;

                pthread_mutex_lock(&img->lock);
                r = img->drv->block_status(img, off, len, &st);
                if (r >= 0 && (st.length == 0 || st.length > len))
                        st.length = len;
                below = img->backing;
                if (r >= 0 && st.type == DC_LAYER_DATA && (st.compressed || st.host_offset < 0 || !img->drv->read_host))
                        r = img->drv->read(img, p, off, (size_t) st.length);
                pthread_mutex_unlock(&img->lock);
                if (r < 0)
                        return r;
                if (st.type == DC_LAYER_DATA && !st.compressed && st.host_offset >= 0 && img->drv->read_host)
                        r = img->drv->read_host(img, p, (uint64_t) st.host_offset, (size_t) st.length);
                else if (st.type == DC_LAYER_UNALLOCATED && below && off < below->virtual_size) {
                        uint64_t n = MIN(st.length, below->virtual_size - off);
                        r = dc_chain_read(below, p, off, (size_t) n);
                        if (n < st.length)
                                memset(p + n, 0, (size_t) (st.length - n));
                } else if (st.type != DC_LAYER_DATA)
                        memset(p, 0, (size_t) st.length);
                if (r < 0)
                        return r;
                p += st.length;
                off += st.length;
                len -= (size_t) st.length;
        }
        return 0;
}

/*
 * Where [off, off+len) of IMG's chain lies, for a reader that does the I/O
 * itself (the NBD server's io_uring reads): the pieces in order, each LEN
 * bytes at HOST of one layer's descriptor (chosen for that part of BUF as
 * dc_image_pread_data would) or zeros (fd -1), neighbours merged.  Returns
 * how many (at least 1), or 0 when the range is anything else: more than
 * MAX pieces, compressed or encrypted data, a remote layer, an error;
 * dc_chain_read reads those.  What makes the reads safe without the lock is
 * what makes dc_chain_read's safe; the caller holds the disk's door open
 * over them (dc_disk_map_read), so the chain stays.
 */
static bool map_add(struct dc_read_map *ret, unsigned max, unsigned *n, int fd, uint64_t host, uint64_t len) {
        struct dc_read_map *last = *n ? &ret[*n - 1] : NULL;

        if (last && last->fd == fd && (fd < 0 || last->host + last->len == host)) {
                last->len += (size_t) len;
                return true;
        }
        if (*n == max)
                return false;
        ret[(*n)++] = (struct dc_read_map){ .fd = fd, .host = fd < 0 ? 0 : host, .len = (size_t) len };
        return true;
}

static bool map_layer(dc_image *img, const uint8_t *buf, uint64_t off, size_t len, struct dc_read_map *ret,
                      unsigned max, unsigned *n) {
        while (len > 0) {
                struct dc_layer_status st;
                dc_image *below;
                int r, fd = -1;

                pthread_mutex_lock(&img->lock);
                r = img->drv->block_status(img, off, len, &st);
                if (r >= 0 && (st.length == 0 || st.length > len))
                        st.length = len;
                below = img->backing;
                if (r >= 0 && st.type == DC_LAYER_DATA && !st.compressed && !st.host_hole && st.host_offset >= 0 &&
                    img->drv->host_fd)
                        fd = img->drv->host_fd(img, buf, (size_t) st.length, (uint64_t) st.host_offset);
                pthread_mutex_unlock(&img->lock);
                if (r < 0)
                        return false;
                if (st.type == DC_LAYER_DATA && !st.host_hole) {
                        if (fd < 0 || !map_add(ret, max, n, fd, (uint64_t) st.host_offset, st.length))
                                return false;
                } else if (st.type == DC_LAYER_UNALLOCATED && below && off < below->virtual_size) {
                        uint64_t m = MIN(st.length, below->virtual_size - off);

                        if (!map_layer(below, buf, off, (size_t) m, ret, max, n) ||
                            (m < st.length && !map_add(ret, max, n, -1, 0, st.length - m)))
                                return false;
                } else if (!map_add(ret, max, n, -1, 0, st.length))
                        return false;
                buf += st.length;
                off += st.length;
                len -= (size_t) st.length;
        }
        return true;
}

int dc_chain_map(dc_image *img, const void *buf, uint64_t off, size_t len, struct dc_read_map *ret, unsigned max) {
        unsigned n = 0;

        return map_layer(img, buf, off, len, ret, max, &n) ? (int) n : 0;
}

DC_EXPORT int dc_image_read(dc_image *img, void *buf, uint64_t off, size_t len) {
        int r = check_range(img, off, len);
        if (r < 0)
                return r;
        return dc_chain_read(img, buf, off, len);
}

#define LOCKED(img, expr)                              \
        ({                                             \
                int _r;                                \
                pthread_mutex_lock(&(img)->lock);      \
                _r = (expr);                           \
                pthread_mutex_unlock(&(img)->lock);    \
                _r;                                    \
        })

DC_EXPORT int dc_image_write(dc_image *img, const void *buf, uint64_t off, size_t len) {
        int r = check_range(img, off, len);
        if (r >= 0)
                r = check_writable(img);
        if (r < 0 || len == 0)
                return r;
        return LOCKED(img, img->drv->write(img, buf, off, len));
}

DC_EXPORT int dc_image_write_zeroes(dc_image *img, uint64_t off, uint64_t len, unsigned flags) {
        int r = check_range(img, off, len);
        if (r >= 0)
                r = check_writable(img);
        if (r < 0 || len == 0)
                return r;
        return LOCKED(img, img->drv->write_zeroes(img, off, len, flags));
}

DC_EXPORT int dc_image_write_compressed(dc_image *img, const void *buf, uint64_t off, size_t len) {
        int r = check_range(img, off, len);
        if (r >= 0)
                r = check_writable(img);
        if (r < 0 || len == 0)
                return r;
        if (!img->drv->write_compressed)
                return dc_error(ENOTSUP, "'%s': %s images cannot hold compressed data", img->path, img->drv->name);
        return LOCKED(img, img->drv->write_compressed(img, buf, off, len));
}

DC_EXPORT int dc_image_discard(dc_image *img, uint64_t off, uint64_t len) {
        int r = check_range(img, off, len);
        if (r >= 0)
                r = check_writable(img);
        if (r < 0 || len == 0)
                return r;
        return LOCKED(img, img->drv->discard(img, off, len));
}

DC_EXPORT int dc_image_flush(dc_image *img) {
        if (!img->writable)
                return 0;
        return LOCKED(img, img->drv->flush(img));
}

DC_EXPORT int dc_image_truncate(dc_image *img, uint64_t size) {
        int r = check_writable(img);
        if (r < 0)
                return r;
        if (size < img->virtual_size)
                return dc_error(ENOTSUP, "'%s': shrinking from %llu to %llu bytes is not supported", img->path,
                                (unsigned long long) img->virtual_size, (unsigned long long) size);
        if (size > INT64_MAX)
                return dc_error(EFBIG, "'%s': size %llu is beyond the largest size, 2^63 - 1 bytes (qemu-img's limit too)",
                                img->path, (unsigned long long) size);
        /* qemu-img resize takes any size for raw, whole sectors for qcow2 */
        if (size % 512 && img->drv != &dc_raw_driver)
                return dc_error(EINVAL, "'%s': size %llu is not a multiple of 512", img->path,
                                (unsigned long long) size);
        return LOCKED(img, img->drv->truncate(img, size));
}

DC_EXPORT int dc_image_check(dc_image *img, int repair, struct dc_check_result *ret) {
        if (!img->drv->check)
                return dc_error(ENOTSUP, "'%s': %s images have no metadata to check", img->path, img->drv->name);
        if (repair != DC_REPAIR_NONE) {
                int r = check_writable(img);
                if (r < 0)
                        return r;
        }
        return LOCKED(img, img->drv->check(img, repair, ret));
}

DC_EXPORT int dc_image_block_status(dc_image *img, uint64_t off, uint64_t len, struct dc_extent *ret) {
        unsigned depth = 0;
        dc_image *layer = img;
        int r;

        r = check_range(img, off, len);
        if (r < 0)
                return r;
        for (;;) {
                struct dc_layer_status st;

                r = LOCKED(layer, layer->drv->block_status(layer, off, len, &st));
                if (r < 0)
                        return r;
                if (st.length == 0 || st.length > len)
                        st.length = len;
                if (st.type == DC_LAYER_UNALLOCATED && layer->backing && off < layer->backing->virtual_size) {
                        len = MIN(st.length, layer->backing->virtual_size - off);
                        layer = layer->backing;
                        depth++;
                        continue;
                }
                *ret = (struct dc_extent){
                        .start = off,
                        .length = st.length,
                        .depth = depth,
                        .present = st.type != DC_LAYER_UNALLOCATED,
                        .zero = st.type != DC_LAYER_DATA || st.host_hole,
                        .data = st.type == DC_LAYER_DATA,
                        .compressed = st.compressed,
                        .host_offset = st.host_offset,
                };
                return 0;
        }
}

DC_EXPORT int dc_image_map(dc_image *img, uint64_t off, uint64_t len, dc_map_cb cb, void *userdata) {
        struct dc_extent cur = { 0 }, e;
        bool have = false;
        int r;

        r = check_range(img, off, len);
        if (r < 0)
                return r;
        while (len > 0) {
                r = dc_image_block_status(img, off, len, &e);
                if (r < 0)
                        return r;
                if (have && cur.depth == e.depth && cur.present == e.present && cur.zero == e.zero &&
                    cur.data == e.data && cur.compressed == e.compressed &&
                    ((cur.host_offset < 0 && e.host_offset < 0) ||
                     (cur.host_offset >= 0 && e.host_offset >= 0 &&
                      (uint64_t) cur.host_offset + cur.length == (uint64_t) e.host_offset)))
                        cur.length += e.length;
                else {
                        if (have) {
                                r = cb(&cur, userdata);
                                if (r < 0)
                                        return r;
                        }
                        cur = e;
                        have = true;
                }
                off += e.length;
                len -= e.length;
        }
        if (have)
                return cb(&cur, userdata);
        return 0;
}

/* --- create --------------------------------------------------------------- */

DC_EXPORT int dc_image_create(const char *path, uint64_t size, const struct dc_create_options *opts,
                              const char *const *roots) {
        static const struct dc_create_options defaults = { .backing_format = -1 };
        const struct dc_create_options *o = opts ? opts : &defaults;
        _cleanup_(dc_image_closep) dc_image *backing = NULL;
        _cleanup_free_ char *abs = NULL;
        _cleanup_close_ int fd = -EBADF;
        const char *bfmt = NULL;
        struct stat st;
        int r;

        dc_error_clear();
        r = dc_path_resolve(path, roots, &abs, NULL);
        if (r < 0)
                return r;
        if (o->format != DC_FORMAT_QCOW2 && o->format != DC_FORMAT_RAW)
                return dc_error(EINVAL, "'%s': unknown format", abs);
        if (o->format == DC_FORMAT_RAW && (o->backing || o->preallocation == DC_PREALLOC_METADATA))
                return dc_error(EINVAL, "'%s': raw images support neither a backing file nor metadata preallocation",
                                abs);
        if (o->backing) {
                _cleanup_free_ char *babs = NULL;
                struct dc_open_options bo = { .roots = roots, .oracle = o->oracle, .no_lock = o->backing_ours };
                r = dc_backing_resolve(abs, o->backing, &babs);
                if (r < 0)
                        return r;
                if (roots) {
                        size_t idx, l;
                        if (find_root(babs, roots, &idx, &l) < 0)
                                return dc_error(EXDEV, "'%s': backing file '%s' is outside the storage roots", abs,
                                                o->backing);
                }
                if (strcmp(babs, abs) == 0)
                        return dc_error(ELOOP, "'%s': an image cannot be its own backing file", abs);
                r = dc_image_open(babs, &bo, &backing);
                if (r < 0)
                        return r;
                if (o->backing_format >= 0 && o->backing_format != dc_image_format(backing))
                        return dc_error(EINVAL, "'%s': backing file '%s' is %s, not %s", abs, o->backing,
                                        dc_format_name(dc_image_format(backing)), dc_format_name(o->backing_format));
                bfmt = dc_format_name(dc_image_format(backing));
                if (size == 0)
                        size = backing->virtual_size;
        }
        /* as qemu-img create: up to 2^63 - 1 bytes, rounded up to whole sectors */
        if (size > INT64_MAX)
                return dc_error(EFBIG, "'%s': size %llu is beyond the largest size, 2^63 - 1 bytes (qemu-img's limit "
                                       "too)", abs, (unsigned long long) size);
        size = ALIGN_UP(size, 512);

        fd = dc_path_open(abs, roots, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0) {
                if (fd == -EEXIST)
                        return dc_error(EEXIST, "'%s' already exists", abs);
                return fd;
        }
        if (fstat(fd, &st) < 0)
                return dc_error(errno, "'%s': cannot stat: %m", abs);
        r = 0;
        if (o->format == DC_FORMAT_RAW) {
                if (ftruncate(fd, (off_t) size) < 0)
                        r = dc_error(errno, "'%s': cannot size the image: %m", abs);
                else if (o->preallocation == DC_PREALLOC_FALLOC && size && fallocate(fd, 0, 0, (off_t) size) < 0)
                        r = dc_error(errno, "'%s': cannot allocate %llu bytes: %m", abs, (unsigned long long) size);
                else if (o->preallocation == DC_PREALLOC_FULL) {
                        static const uint8_t zeros[1 << 16];
                        for (uint64_t p = 0; p < size && r >= 0; p += sizeof zeros)
                                r = dc_pwrite_full(fd, zeros, (size_t) MIN((uint64_t) sizeof zeros, size - p), p);
                        if (r < 0)
                                r = dc_error(r, "'%s': cannot write zeros: %s", abs, strerror(-r));
                }
                if (r >= 0 && (r = dc_fdatasync(fd)) < 0)
                        r = dc_error(r, "'%s': sync failed: %s", abs, strerror(-r));
                /* the format is recorded as soon as the file is what it will be */
                if (r >= 0 && o->oracle && o->oracle->created)
                        r = o->oracle->created(o->oracle->userdata, abs, fd, o->format);
        } else {
                r = dc_qcow2_create(fd, size, o, bfmt);
                if (r < 0)
                        r = dc_error(r, "'%s': %s", abs, dc_get_error());
                if (r >= 0 && o->oracle && o->oracle->created)
                        r = o->oracle->created(o->oracle->userdata, abs, fd, o->format);
                if (r >= 0 && o->preallocation != DC_PREALLOC_OFF) {
                        _cleanup_(dc_image_closep) dc_image *img = NULL;
                        struct dc_open_options no = { .roots = roots, .oracle = o->oracle, .writable = true,
                                                      .no_backing = true };
                        r = dc_image_open(abs, &no, &img);
                        if (r >= 0)
                                r = dc_qcow2_preallocate(img, o->preallocation);
                }
        }
        if (r < 0) {
                int saved = dc_get_errno();
                char msg[1024];
                snprintf(msg, sizeof msg, "%s", dc_get_error());
                /* only the file we made: relative to its directory, and only if it is still ours */
                if (roots)
                        (void) dc_path_unlink(abs, roots, &st);
                else
                        (void) unlink(abs);
                return dc_error(saved, "%s", msg);
        }
        return 0;
}

DC_EXPORT int dc_image_set_backing(dc_image *img, const char *backing, const char *backing_format) {
        int r = check_writable(img);
        if (r < 0)
                return r;
        if (img->drv != &dc_qcow2_driver)
                return dc_error(ENOTSUP, "'%s': %s images have no backing file", img->path, img->drv->name);
        return LOCKED(img, dc_qcow2_set_backing(img, backing, backing_format));
}

/* --- properties ------------------------------------------------------------- */

DC_EXPORT const char *dc_format_name(int format) {
        return format == DC_FORMAT_QCOW2 ? "qcow2" : "raw";
}

DC_EXPORT const char *dc_image_path(dc_image *img) {
        return img->path;
}
DC_EXPORT int dc_image_fd(dc_image *img) {
        return img->fd;
}
DC_EXPORT int dc_image_format(dc_image *img) {
        return img->drv->format;
}
DC_EXPORT uint64_t dc_image_virtual_size(dc_image *img) {
        return img->virtual_size;
}
DC_EXPORT uint64_t dc_image_actual_size(dc_image *img) {
        struct stat st;
        if (fstat(img->fd, &st) < 0)
                return 0;
        return (uint64_t) st.st_blocks * 512;
}
DC_EXPORT const char *dc_image_backing_file(dc_image *img) {
        return img->backing_file ? img->backing_file : "";
}
DC_EXPORT const char *dc_image_backing_format(dc_image *img) {
        return img->backing_format ? img->backing_format : "";
}
DC_EXPORT dc_image *dc_image_backing(dc_image *img) {
        return img->backing;
}
DC_EXPORT bool dc_image_read_only(dc_image *img) {
        return !img->writable;
}
DC_EXPORT const char *dc_image_read_only_reason(dc_image *img) {
        return img->read_only_reason ? img->read_only_reason : "";
}
