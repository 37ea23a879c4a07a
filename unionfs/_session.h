/*
 * What the parts of the C session helper (unionfs._dircache) share:
 * _dircache.c, which takes pyfuse3's place in fuse_session_new and answers
 * READ, _dispatch.c, whose callbacks it puts in the operations table, and
 * _readpool.c, whose workers answer READs that would wait for the disk, and
 * _prefetch.c, whose workers read cold directories ahead of lookups.  Hidden: the
 * module is loaded RTLD_GLOBAL (for fuse_session_new), and these names are
 * nobody else's business.
 */
#ifndef UNIONFS_SESSION_H
#define UNIONFS_SESSION_H

#define UNIONFS_HIDDEN __attribute__((visibility("hidden")))

/* Log2 buckets of nanoseconds, as unionfs/stats.py counts latencies. */
#define UNIONFS_BUCKETS 64

#include <time.h>

static inline long long unionfs_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The bucket of a request that started at start (unionfs_now_ns). */
static inline unsigned unionfs_bucket_since(long long start)
{
    long long took = unionfs_now_ns() - start;
    return took > 0 ? 64 - (unsigned)__builtin_clzll((unsigned long long)took) : 0;
}

#include <fuse_lowlevel.h>
#include <pthread.h>
#include <signal.h>

/* Start n detached threads running fn with every signal blocked (signals stay the
 * Python thread's; the mask is inherited at creation).  Returns how many started. */
static inline int unionfs_start_threads(void *(*fn)(void *), int n)
{
    sigset_t all, old;
    int started = 0;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int i = 0; i < n; i++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, fn, NULL) == 0)
            started++;
        pthread_attr_destroy(&attr);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return started;
}

/* Put the dispatching callbacks in table (libfuse: dlopen's handle), if
 * enable_dispatch() was called; dirs_cached: opendir replies must ask the
 * kernel to cache listings.  1 if it did. */
UNIONFS_HIDDEN int unionfs_dispatch_patch(struct fuse_lowlevel_ops *table, void *libfuse,
                                          int dirs_cached);
/* The session whose requests bursts read (see _dispatch.c). */
UNIONFS_HIDDEN void unionfs_dispatch_session(struct fuse_session *se);
/* A request was answered in C outside _dispatch.c (a READ): bursts go on. */
UNIONFS_HIDDEN void unionfs_dispatch_answered(void);
/* Whether enable_dispatch() was called. */
UNIONFS_HIDDEN int unionfs_dispatch_wanted(void);
/* A buffer a thread reads into, grown to the largest READ it answered. */
struct unionfs_read_buffer {
    char *mem;
    size_t size;
};

/* Answer a READ by a blocking read of fd (a worker's; start: when it came). */
typedef void (*unionfs_read_answer)(fuse_req_t req, int fd, size_t size, off_t off,
                                    struct unionfs_read_buffer *buf, long long start);

/* Queue a READ for a worker of _readpool.c, which answers it with how; 0 if
 * it could not be queued (answer it in the caller). */
UNIONFS_HIDDEN int unionfs_readpool_submit(fuse_req_t req, int fd, size_t size, off_t off,
                                           long long start, unionfs_read_answer how);
/* READs queued so far. */
UNIONFS_HIDDEN unsigned long long unionfs_readpool_submitted(void);
/* Wait until every queued READ is answered. */
UNIONFS_HIDDEN void unionfs_readpool_drain(void);

/* A list of UNIONFS_BUCKETS counts, as stats.py's sources return them. */
UNIONFS_HIDDEN PyObject *unionfs_bucket_list(const unsigned long long *counts);
/* The Python functions of _dispatch.c and _prefetch.c, added to the module's own. */
UNIONFS_HIDDEN extern PyMethodDef unionfs_dispatch_methods[];
UNIONFS_HIDDEN extern PyMethodDef unionfs_prefetch_methods[];

#endif
