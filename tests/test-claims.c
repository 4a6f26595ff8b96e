/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of the claims on images (daemon/claims.c): a job's claim taken
 * all or nothing and refused, with the words of the Busy error, when a path
 * is another job's or the target is another job's target; release giving
 * back only what the job holds; who holds a path; and the counted holds of
 * our own read-write work.
 */

#include <errno.h>
#include <string.h>

#include "check.h"
#include "claims.h"

static bool streq(const char *a, const char *b) {
        return a && b && strcmp(a, b) == 0;
}

static void test_take_release(void) {
        Claims *c = claims_new();
        char *msg = NULL;

        CHECK(claims_take(c, "job0", (char *[]){ "/r/a", "/r/b", NULL }, NULL, NULL, &msg) == 0);
        CHECK(!msg);
        CHECK(streq(claims_holder(c, "/r/a"), "job0"));
        CHECK(streq(claims_holder(c, "/r/b"), "job0"));
        CHECK(!claims_holder(c, "/r/c"));
        CHECK(!claims_target_of(c, "/r/a"));

        CHECK(claims_take(c, "job1", (char *[]){ "/r/c", "/r/t", NULL }, "/r/t", NULL, &msg) == 0);
        CHECK(streq(claims_target_of(c, "/r/t"), "job1"));
        CHECK(streq(claims_holder(c, "/r/t"), "job1"));

        /* another job's release gives back nothing */
        CHECK(!claims_release(c, "job0", (char *[]){ "/r/c", "/r/t", NULL }, "/r/t"));
        CHECK(streq(claims_holder(c, "/r/c"), "job1"));
        CHECK(streq(claims_target_of(c, "/r/t"), "job1"));

        CHECK(claims_release(c, "job1", (char *[]){ "/r/c", "/r/t", NULL }, "/r/t"));
        CHECK(!claims_holder(c, "/r/c") && !claims_holder(c, "/r/t") && !claims_target_of(c, "/r/t"));
        CHECK(!claims_release(c, "job1", (char *[]){ "/r/c", "/r/t", NULL }, "/r/t")); /* twice: harmless */
        CHECK(!claims_release(c, "job0", (char *[]){ "/r/a", "/r/b", NULL }, NULL));
        CHECK(!claims_holder(c, "/r/a") && !claims_holder(c, "/r/b"));
        /* given back, the paths can be claimed again */
        CHECK(claims_take(c, "job2", (char *[]){ "/r/a", NULL }, "/r/t", NULL, &msg) == 0);
        CHECK(streq(claims_holder(c, "/r/a"), "job2"));
        claims_free(c);
        CHECK(claims_free(NULL) == NULL);
}

static void test_refused(void) {
        Claims *c = claims_new();
        char *msg = NULL;

        CHECK(claims_take(c, "stream0", (char *[]){ "/r/top", "/r/base", NULL }, NULL, NULL, &msg) == 0);
        CHECK(claims_take(c, "mirror0", (char *[]){ "/r/other", "/r/t", NULL }, "/r/t", NULL, &msg) == 0);

        /* a path in use: the first one found is named, and nothing is taken */
        CHECK(claims_take(c, "commit0", (char *[]){ "/r/x", "/r/base", "/r/top", NULL }, NULL, NULL, &msg) == -EBUSY);
        CHECK(streq(msg, "'/r/base' is in use by job 'stream0'"));
        g_free(msg), msg = NULL;
        CHECK(!claims_holder(c, "/r/x"));

        /* a path in use wins over the target */
        CHECK(claims_take(c, "backup0", (char *[]){ "/r/y", "/r/top", NULL }, "/r/t", NULL, &msg) == -EBUSY);
        CHECK(streq(msg, "'/r/top' is in use by job 'stream0'"));
        g_free(msg), msg = NULL;

        /* the target of another job, not claimed busy by it (given back before the target) */
        CHECK(!claims_release(c, "mirror0", (char *[]){ "/r/t", NULL }, NULL));
        CHECK(claims_take(c, "backup1", (char *[]){ "/r/y", NULL }, "/r/t", NULL, &msg) == -EBUSY);
        CHECK(streq(msg, "'/r/t' is the target of job 'mirror0'"));
        g_free(msg), msg = NULL;
        CHECK(!claims_holder(c, "/r/y"));
        CHECK(streq(claims_target_of(c, "/r/t"), "mirror0"));

        /* an NBD export (a URI: no image of the model) one job reads and another would write, either way */
        CHECK(claims_take(c, "restore0", (char *[]){ "nbd://h/e", NULL }, "/r/new", NULL, &msg) == 0);
        CHECK(claims_take(c, "run0", (char *[]){ "/r/vm", NULL }, "nbd://h/e", NULL, &msg) == -EBUSY);
        CHECK(streq(msg, "'nbd://h/e' is in use by job 'restore0'"));
        g_free(msg), msg = NULL;
        CHECK(!claims_holder(c, "/r/vm"));
        CHECK(claims_release(c, "restore0", (char *[]){ "nbd://h/e", NULL }, "/r/new"));
        CHECK(claims_take(c, "run0", (char *[]){ "/r/vm", NULL }, "nbd://h/e", NULL, &msg) == 0);
        CHECK(claims_take(c, "restore1", (char *[]){ "nbd://h/e", NULL }, "/r/new", NULL, &msg) == -EBUSY);
        CHECK(streq(msg, "'nbd://h/e' is the target of job 'run0'"));
        g_free(msg), msg = NULL;
        CHECK(!claims_target_of(c, "/r/new"));

        /* a job's own paths are claimed once: a second claim by the same id is refused too */
        CHECK(claims_take(c, "stream0", (char *[]){ "/r/top", NULL }, NULL, NULL, &msg) == -EBUSY);
        g_free(msg), msg = NULL;
        claims_free(c);
}

static void test_hold(void) {
        Claims *c = claims_new();

        CHECK(!claims_held(c, "/r/a"));
        claims_hold(c, (char *[]){ "/r/a", "/r/b", NULL }, +1);
        claims_hold(c, (char *[]){ "/r/a", NULL }, +1);
        CHECK(claims_held(c, "/r/a") && claims_held(c, "/r/b"));
        claims_hold(c, (char *[]){ "/r/a", "/r/b", NULL }, -1);
        CHECK(claims_held(c, "/r/a")); /* one hold left */
        CHECK(!claims_held(c, "/r/b"));
        claims_hold(c, (char *[]){ "/r/a", NULL }, -1);
        CHECK(!claims_held(c, "/r/a"));
        claims_hold(c, (char *[]){ "/r/a", NULL }, -1); /* not held: stays so */
        CHECK(!claims_held(c, "/r/a"));
        claims_hold(c, NULL, +1);
        /* holds are no claims */
        claims_hold(c, (char *[]){ "/r/a", NULL }, +1);
        CHECK(!claims_holder(c, "/r/a"));
        claims_free(c); /* with a hold left */
}

static void test_export(void) {
        Claims *c = claims_new();
        g_autofree char *msg = NULL;

        /* an export claims its chain; a job through it may use the images, another job may not */
        CHECK(claims_export(c, "vm1", (char *[]){ "/r/top", "/r/base", NULL }, &msg) == 0);
        CHECK(streq(claims_exporter(c, "/r/top"), "vm1"));
        CHECK(claims_held(c, "/r/base")); /* its QEMU lock is ours */
        CHECK(claims_take(c, "mirror0", (char *[]){ "/r/top", "/r/base", NULL }, NULL, NULL, &msg) == -EBUSY);
        CHECK(msg && strstr(msg, "exported over NBD as 'vm1'"));
        g_free(msg), msg = NULL;
        CHECK(claims_take(c, "mirror0", (char *[]){ "/r/top", "/r/base", NULL }, NULL, "vm2", &msg) == -EBUSY);
        g_free(msg), msg = NULL;
        CHECK(!claims_holder(c, "/r/top"));
        /* nor write an exported image as its target */
        CHECK(claims_take(c, "backup0", (char *[]){ "/r/other", NULL }, "/r/base", NULL, &msg) == -EBUSY);
        g_free(msg), msg = NULL;
        CHECK(!claims_holder(c, "/r/other"));
        CHECK(claims_take(c, "mirror0", (char *[]){ "/r/top", "/r/base", "/r/t", NULL }, "/r/t", "vm1", &msg) == 0);
        /* a second export of an image in use by a job, or exported already, is refused */
        CHECK(claims_export(c, "vm2", (char *[]){ "/r/t", NULL }, &msg) == -EBUSY);
        CHECK(msg && strstr(msg, "job 'mirror0'"));
        g_free(msg), msg = NULL;
        CHECK(claims_export(c, "vm2", (char *[]){ "/r/x", "/r/base", NULL }, &msg) == -EBUSY);
        CHECK(!claims_exporter(c, "/r/x"));
        g_free(msg), msg = NULL;
        CHECK(claims_release(c, "mirror0", (char *[]){ "/r/top", "/r/base", "/r/t", NULL }, "/r/t"));
        /* released only by its own name */
        claims_unexport(c, "vm2", (char *[]){ "/r/top", NULL });
        CHECK(streq(claims_exporter(c, "/r/top"), "vm1"));
        claims_unexport(c, "vm1", (char *[]){ "/r/top", "/r/base", NULL });
        CHECK(!claims_exporter(c, "/r/top") && !claims_held(c, "/r/base"));
        CHECK(claims_export(c, "vm2", (char *[]){ "/r/x", "/r/base", NULL }, &msg) == 0);
        claims_free(c);
}

int main(void) {
        test_take_release();
        test_refused();
        test_hold();
        test_export();
        return check_report("test-claims");
}
