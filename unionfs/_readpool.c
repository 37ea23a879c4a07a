/*
 * READs whose data is not in the page cache, answered by worker threads
 * (part of the C session helper, unionfs._dircache; READ itself is answered
 * in _dircache.c).
 *
 * The daemon serves requests in one thread.  A READ of data on disk blocks
 * that thread for the disk's latency, and every other request, of every
 * other client, waits behind it: four processes reading their own files cold
 * got no faster together than one alone, where fuse-overlayfs and the kernel
 * got 1.5x faster (issue 16).  So _dircache.c first reads with RWF_NOWAIT,
 * which answers from the page cache or fails with EAGAIN at once, and only
 * a READ that would wait comes here: a worker reads (blocking) and replies,
 * while the daemon's thread goes on with the next request.  A READ of cached
 * data (the common case) costs one system call as before and no thread.
 *
 * Replies from several threads are how libfuse's multi-threaded loop works
 * (each reply is one writev, or a splice through a per-thread pipe).  The
 * descriptor stays open while its READ is queued: the kernel sends RELEASE
 * only once no request of the file is outstanding (a reading process holds
 * the file; an asynchronous read-ahead holds the fuse_file).  Workers never
 * touch Python, and block every signal, which stay the Python thread's.
 * fuse_session_destroy waits for the queue to drain (_dircache.c), so no
 * reply goes to a freed session.
 */
#define FUSE_USE_VERSION 35
#include <Python.h> /* only for _session.h's Python types */
#include <errno.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

#include "_session.h"

#define WORKERS 4
#define QUEUE 1024

struct job {
    fuse_req_t req;
    int fd;
    size_t size;
    off_t off;
    long long start;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t idle = PTHREAD_COND_INITIALIZER;
static struct job queue[QUEUE];
static unsigned head, queued, busy;
static int started;
static unsigned long long submitted;
static unionfs_read_answer answer;

static void *worker(void *unused)
{
    (void)unused;
    struct unionfs_read_buffer buf = {NULL, 0};
    pthread_mutex_lock(&lock);
    for (;;) {
        while (queued == 0)
            pthread_cond_wait(&work, &lock);
        struct job j = queue[head];
        head = (head + 1) % QUEUE;
        queued--;
        busy++;
        pthread_mutex_unlock(&lock);
        answer(j.req, j.fd, j.size, j.off, &buf, j.start);
        pthread_mutex_lock(&lock);
        busy--;
        if (queued == 0 && busy == 0)
            pthread_cond_broadcast(&idle);
    }
    return NULL;
}

/* Start the workers (under lock); 0 if none could be started. */
static int start_workers(void)
{
    started = unionfs_start_threads(worker, WORKERS);
    return started;
}

int unionfs_readpool_submit(fuse_req_t req, int fd, size_t size, off_t off, long long start,
                            unionfs_read_answer how)
{
    pthread_mutex_lock(&lock);
    answer = how;
    int ok = (started || start_workers()) && queued < QUEUE;
    if (ok) {
        queue[(head + queued) % QUEUE] = (struct job){req, fd, size, off, start};
        queued++;
        submitted++;
        pthread_cond_signal(&work);
    }
    pthread_mutex_unlock(&lock);
    return ok;
}

void unionfs_readpool_drain(void)
{
    pthread_mutex_lock(&lock);
    while (queued != 0 || busy != 0)
        pthread_cond_wait(&idle, &lock);
    pthread_mutex_unlock(&lock);
}

unsigned long long unionfs_readpool_submitted(void)
{
    pthread_mutex_lock(&lock);
    unsigned long long n = submitted;
    pthread_mutex_unlock(&lock);
    return n;
}
