/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The fuzz targets as ordinary tests: each input of the corpus (files, or
 * every file of the directories given; meson passes the corpus directory, so
 * that a new entry needs no reconfiguration) through the target once.
 * Linked beside a target when it is built without the fuzzing engine.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay_file(const char *path) {
        FILE *f = fopen(path, "rb");
        uint8_t *buf;
        long len;

        if (!f) {
                perror(path);
                return -1;
        }
        fseek(f, 0, SEEK_END);
        len = ftell(f);
        fseek(f, 0, SEEK_SET);
        buf = malloc(len > 0 ? (size_t) len : 1);
        if (!buf || fread(buf, 1, (size_t) len, f) != (size_t) len) {
                fclose(f);
                free(buf);
                return -1;
        }
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t) len);
        free(buf);
        return 0;
}

int main(int argc, char **argv) {
        int n = 0;

        for (int i = 1; i < argc; i++) {
                struct dirent **list;
                struct stat st;
                int k;

                if (stat(argv[i], &st) < 0 || !S_ISDIR(st.st_mode)) {
                        if (replay_file(argv[i]) < 0)
                                return 1;
                        n++;
                        continue;
                }
                k = scandir(argv[i], &list, NULL, alphasort);
                if (k < 0) {
                        perror(argv[i]);
                        return 1;
                }
                for (int j = 0; j < k; j++) {
                        char p[4096];
                        snprintf(p, sizeof p, "%s/%s", argv[i], list[j]->d_name);
                        if (list[j]->d_name[0] != '.' && stat(p, &st) == 0 && S_ISREG(st.st_mode)) {
                                if (replay_file(p) < 0)
                                        return 1;
                                n++;
                        }
                        free(list[j]);
                }
                free(list);
        }
        printf("%s: replayed %d inputs\n", program_invocation_short_name, n);
        return n > 0 ? 0 : 1;
}
