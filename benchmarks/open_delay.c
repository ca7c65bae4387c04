/* LD_PRELOAD shim for benchmarks/loader.py: an injected per-open delay, standing in for the
 * metadata round trip a network file system (Lustre, NFS) pays on every open. It is NOT a real
 * network mount: reads stay local (page cache) and only opening a file costs more.
 *
 * Every open/open64/openat/openat64 (and their _FORTIFY_SOURCE forms __open_2 ...) and fopen/
 * fopen64 of a path under one of the prefixes sleeps OPEN_DELAY_MS milliseconds (a decimal,
 * e.g. 0.5) before opening; other opens are not delayed. Prefixes: OPEN_DELAY_PREFIX, absolute
 * paths separated by ':'. A relative path is resolved against the working directory, or against
 * the directory of `dirfd` for openat (read from /proc/self/fd). The sleep is a plain nanosleep
 * in the calling thread, so other threads (DALI's, a reader pool's) keep running meanwhile, as
 * they would while one thread waits on a metadata server.
 *
 *     gcc -shared -fPIC -O2 -o open_delay.so benchmarks/open_delay.c -ldl
 *     OPEN_DELAY_MS=1 OPEN_DELAY_PREFIX=/data/tree LD_PRELOAD=$PWD/open_delay.so python ...
 */
#undef _FORTIFY_SOURCE
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_PREFIXES 16

static char prefixes[MAX_PREFIXES][PATH_MAX];
static size_t prefix_len[MAX_PREFIXES];
static int n_prefixes;
static struct timespec delay;
static int enabled;

__attribute__((constructor)) static void open_delay_init(void) {
    const char *ms = getenv("OPEN_DELAY_MS");
    const char *list = getenv("OPEN_DELAY_PREFIX");
    if (!ms || !list)
        return;
    double value = strtod(ms, NULL);
    if (!(value > 0))
        return;
    long long ns = (long long)(value * 1e6);
    delay.tv_sec = (time_t)(ns / 1000000000LL);
    delay.tv_nsec = (long)(ns % 1000000000LL);
    const char *p = list;
    while (*p && n_prefixes < MAX_PREFIXES) {
        const char *end = strchr(p, ':');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        while (len > 1 && p[len - 1] == '/') /* "/data/tree/" matches like "/data/tree" */
            len--;
        if (len > 0 && len < PATH_MAX && p[0] == '/') {
            memcpy(prefixes[n_prefixes], p, len);
            prefixes[n_prefixes][len] = '\0';
            prefix_len[n_prefixes++] = len;
        }
        if (!end)
            break;
        p = end + 1;
    }
    enabled = n_prefixes > 0;
}

static int matches(const char *path) {
    for (int i = 0; i < n_prefixes; i++) {
        size_t n = prefix_len[i];
        if (strncmp(path, prefixes[i], n) == 0 && (path[n] == '/' || path[n] == '\0' || n == 1))
            return 1;
    }
    return 0;
}

static int under_prefix(int dirfd, const char *path) {
    if (!path)
        return 0;
    if (path[0] == '/')
        return matches(path);
    char full[PATH_MAX];
    ssize_t len;
    if (dirfd == AT_FDCWD) {
        if (!getcwd(full, sizeof full))
            return 0;
        len = (ssize_t)strlen(full);
    } else {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        len = readlink(link, full, sizeof full - 1);
        if (len < 0)
            return 0;
        full[len] = '\0';
    }
    if ((size_t)len + 1 + strlen(path) >= sizeof full)
        return 0;
    full[len] = '/';
    strcpy(full + len + 1, path);
    return matches(full);
}

static void maybe_delay(int dirfd, const char *path) {
    if (!enabled || !under_prefix(dirfd, path))
        return;
    int saved = errno;
    struct timespec left = delay;
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {
    }
    errno = saved;
}

static void *next(const char *name) {
    return dlsym(RTLD_NEXT, name);
}

static mode_t mode_of(int flags, va_list ap) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

#define OPEN_LIKE(name)                                                        \
    int name(const char *path, int flags, ...) {                               \
        static int (*real)(const char *, int, ...);                            \
        va_list ap;                                                            \
        va_start(ap, flags);                                                   \
        mode_t mode = mode_of(flags, ap);                                      \
        va_end(ap);                                                            \
        if (!real)                                                             \
            real = (int (*)(const char *, int, ...))next(#name);               \
        maybe_delay(AT_FDCWD, path);                                           \
        return real(path, flags, mode);                                        \
    }

#define OPENAT_LIKE(name)                                                      \
    int name(int dirfd, const char *path, int flags, ...) {                    \
        static int (*real)(int, const char *, int, ...);                       \
        va_list ap;                                                            \
        va_start(ap, flags);                                                   \
        mode_t mode = mode_of(flags, ap);                                      \
        va_end(ap);                                                            \
        if (!real)                                                             \
            real = (int (*)(int, const char *, int, ...))next(#name);          \
        maybe_delay(dirfd, path);                                              \
        return real(dirfd, path, flags, mode);                                 \
    }

OPEN_LIKE(open)
OPEN_LIKE(open64)
OPENAT_LIKE(openat)
OPENAT_LIKE(openat64)

/* _FORTIFY_SOURCE builds call these instead of open/openat when the flags are not constant */
int __open_2(const char *path, int flags) {
    static int (*real)(const char *, int);
    if (!real)
        real = (int (*)(const char *, int))next("__open_2");
    maybe_delay(AT_FDCWD, path);
    return real(path, flags);
}

int __open64_2(const char *path, int flags) {
    static int (*real)(const char *, int);
    if (!real)
        real = (int (*)(const char *, int))next("__open64_2");
    maybe_delay(AT_FDCWD, path);
    return real(path, flags);
}

int __openat_2(int dirfd, const char *path, int flags) {
    static int (*real)(int, const char *, int);
    if (!real)
        real = (int (*)(int, const char *, int))next("__openat_2");
    maybe_delay(dirfd, path);
    return real(dirfd, path, flags);
}

int __openat64_2(int dirfd, const char *path, int flags) {
    static int (*real)(int, const char *, int);
    if (!real)
        real = (int (*)(int, const char *, int))next("__openat64_2");
    maybe_delay(dirfd, path);
    return real(dirfd, path, flags);
}

/* glibc's fopen opens through an internal call that no interposed open sees */
FILE *fopen(const char *path, const char *mode) {
    static FILE *(*real)(const char *, const char *);
    if (!real)
        real = (FILE * (*)(const char *, const char *)) next("fopen");
    maybe_delay(AT_FDCWD, path);
    return real(path, mode);
}

FILE *fopen64(const char *path, const char *mode) {
    static FILE *(*real)(const char *, const char *);
    if (!real)
        real = (FILE * (*)(const char *, const char *)) next("fopen64");
    maybe_delay(AT_FDCWD, path);
    return real(path, mode);
}
