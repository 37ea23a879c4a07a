/*
 * Let the kernel cache directory listings (FOPEN_CACHE_DIR), which pyfuse3 3.5
 * cannot ask for: its opendir handler replies with a copy of the
 * fuse_file_info that libfuse gave it, setting only fh.
 *
 * This module defines fuse_session_new.  Loaded with RTLD_GLOBAL before
 * pyfuse3 first calls it, this definition is the one pyfuse3 binds to; it
 * calls libfuse's own with an operations table whose opendir first sets
 * cache_readdir and keep_cache in that fuse_file_info, then calls pyfuse3's
 * opendir, whose copy (and so the reply) keeps the two bits.
 *
 * The kernel drops a cached listing whenever a directory changes through the
 * mount (create, unlink, rename, ...), and every change to the union goes
 * through the mount, so the cache stays exact.  Off unless enable() is called.
 *
 * The same table answers READ in C (enable_read()): a READ is a pread of the
 * handle's descriptor, which needs no Python state, and pyfuse3's dispatch of
 * one request (Python objects, a coroutine, trio's machinery) costs about
 * twice what the pread does.  The daemon registers each file handle's
 * descriptor here when it makes the handle and unregisters it at release,
 * before closing it; a READ on an unregistered handle goes to pyfuse3.
 * WRITE likewise (a pwrite of the handle's descriptor, from where libfuse
 * read the request): pyfuse3 would copy the data into a bytes object first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "_session.h"

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static int enabled;
static int used;
static int acl_wanted;
static struct fuse_lowlevel_ops patched;
static void (*inner_opendir)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_init)(void *, struct fuse_conn_info *);
static int read_wanted;
static int read_used;
static void (*inner_read)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static void (*inner_write_buf)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t,
                               struct fuse_file_info *);
static int write_used;
/* libfuse's replies, looked up with fuse_session_new (this module does not
 * link libfuse: it is loaded before anything else has loaded it). */
static int (*reply_buf)(fuse_req_t, const char *, size_t);
static int (*reply_err)(fuse_req_t, int);
static int (*reply_write)(fuse_req_t, size_t);

/*
 * Descriptors of file handles, by handle number: slot fh % SLOTS holds one
 * (fh, fd) pair.  The daemon numbers handles from 1 up and never reuses a
 * number, so a slot's fh names one handle for good (a reused descriptor
 * number cannot be mistaken for it); a handle whose slot is taken by a
 * still-open older one is not registered and is read by Python.  Only the
 * thread that runs the FUSE session touches the table (with the GIL held:
 * registration from the handlers, lookups from the READ callback that
 * pyfuse3's loop calls), so it needs no lock.
 */
#define SLOTS (1u << 16)
static struct {
    uint64_t fh; /* 0: free */
    int fd;
} slots[SLOTS];

/* READs answered here: log2 buckets of nanoseconds, as stats.py counts
 * (incremented by the workers of _readpool.c too). */
static unsigned long long read_buckets[UNIONFS_BUCKETS];
/* WRITEs answered here (only by the daemon's thread). */
static unsigned long long write_buckets[UNIONFS_BUCKETS];

/* The buffer of the daemon's thread (workers have their own). */
static struct unionfs_read_buffer main_buf;

/* Queue READs of data not in the page cache for _readpool.c's workers. */
static int pool_wanted;
static long page_size = 4096; /* sysconf'd when the pool is enabled */

static void count_read(long long start)
{
    __atomic_fetch_add(&read_buckets[unionfs_bucket_since(start)], 1, __ATOMIC_RELAXED);
}

static int grow(struct unionfs_read_buffer *buf, size_t size)
{
    if (size <= buf->size)
        return 1;
    char *grown = malloc(size);
    if (grown == NULL)
        return 0;
    free(buf->mem);
    buf->mem = grown;
    buf->size = size;
    return 1;
}

/*
 * A blocking pread or pwrite, with the GIL released if this thread holds it
 * (as os.pread and os.pwrite do), retried on EINTR as they retry (the
 * signal's Python handler runs later, on the loop).
 */
static ssize_t pio_blocking(int fd, char *mem, size_t size, off_t off, int writing)
{
    ssize_t n;
    int holds_gil = PyGILState_Check();
    PyThreadState *ts = holds_gil ? PyEval_SaveThread() : NULL;
    do
        n = writing ? pwrite(fd, mem, size, off) : pread(fd, mem, size, off);
    while (n < 0 && errno == EINTR);
    int saved = errno;
    if (holds_gil)
        PyEval_RestoreThread(ts);
    errno = saved;
    return n;
}

static ssize_t pread_blocking(int fd, char *mem, size_t size, off_t off)
{
    return pio_blocking(fd, mem, size, off, 0);
}

/*
 * READs of these sizes are spliced: the data goes from the file's page
 * cache through a pipe to /dev/fuse (fuse_reply_data of a descriptor buffer,
 * FUSE_CAP_SPLICE_WRITE), not copied into a buffer and out again.  Measured
 * (benchmarks/cpu.py, O_DIRECT reads through the mount, daemon CPU a READ,
 * interleaved): 128 KiB 16.8-20.3 us spliced against 20.5-25.6 us copied, in
 * each of 8 pairs; 32 KiB mixed (8.4-14.2 against 9.3-12.6 us); 4 KiB is
 * cheaper copied (libfuse itself copies below two pages); 1 MiB (big
 * sequential reads with the mount's 1 MiB read-ahead) twice as dear spliced,
 * 400-475 against 204-290 us copied.  Errors of the read come back from
 * libfuse as an errno reply.
 */
#define SPLICE_MIN (64 * 1024)
#define SPLICE_MAX (128 * 1024)
static int (*reply_data)(fuse_req_t, struct fuse_bufvec *, enum fuse_buf_copy_flags);

static int spliced(size_t size)
{
    return size >= SPLICE_MIN && size <= SPLICE_MAX && reply_data != NULL;
}

static int splice_reply(fuse_req_t req, int fd, size_t size, off_t off)
{
    struct fuse_bufvec bv = FUSE_BUFVEC_INIT(size);
    bv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    bv.buf[0].fd = fd;
    bv.buf[0].pos = off;
    int holds_gil = PyGILState_Check();
    PyThreadState *ts = holds_gil ? PyEval_SaveThread() : NULL;
    int r = reply_data(req, &bv, 0);
    if (holds_gil)
        PyEval_RestoreThread(ts);
    return r;
}

/* Answer a READ, waiting for the disk if need be (the daemon's thread or a worker). */
static int answer_read(fuse_req_t req, int fd, size_t size, off_t off,
                       struct unionfs_read_buffer *buf)
{
    if (spliced(size))
        return splice_reply(req, fd, size, off);
    if (!grow(buf, size))
        return reply_err(req, ENOMEM);
    ssize_t n = pread_blocking(fd, buf->mem, size, off);
    if (n < 0)
        return reply_err(req, errno ? errno : EIO);
    return reply_buf(req, buf->mem, (size_t)n);
}

/* How _readpool.c's workers answer. */
static void pool_answer(fuse_req_t req, int fd, size_t size, off_t off,
                        struct unionfs_read_buffer *buf, long long start)
{
    answer_read(req, fd, size, off, buf);
    count_read(start);
}

/*
 * Answer a READ from the page cache alone (RWF_NOWAIT): 1 if answered, 0 if
 * its first bytes are not cached (a worker should wait for them), -1 if this
 * cannot tell (RWF_NOWAIT refused: answer it blocking).  A spliced READ is
 * probed by its first byte; a short read is finished blocking, which at the
 * end of the file (a small file's only READ) costs no wait.
 */
static int answer_cached(fuse_req_t req, int fd, size_t size, off_t off)
{
    ssize_t n;
    if (spliced(size)) {
        char probe;
        struct iovec v = {&probe, 1};
        n = preadv2(fd, &v, 1, off, RWF_NOWAIT);
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        splice_reply(req, fd, size, off);
        return 1;
    }
    if (!grow(&main_buf, size)) {
        reply_err(req, ENOMEM);
        return 1;
    }
    struct iovec v = {main_buf.mem, size};
    n = preadv2(fd, &v, 1, off, RWF_NOWAIT);
    if (n < 0)
        return errno == EAGAIN ? 0 : -1;
    if (n == 0 && size > 0)
        return -1; /* at or past the end, or a hole it will not read: ask again, blocking */
    if ((size_t)n < size && (off + n) % page_size == 0) {
        /* Stopped at a page boundary: the next page may only be uncached, not
         * past the end (a read that ends at the end of the file ends there
         * only if the size is a multiple of a page: then this costs one pread
         * that returns 0). */
        ssize_t rest = pread_blocking(fd, main_buf.mem + n, size - (size_t)n, off + n);
        if (rest > 0)
            n += rest;
    }
    reply_buf(req, main_buf.mem, (size_t)n);
    return 1;
}

static void fast_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    uint64_t fh = fi->fh;
    unsigned slot = (unsigned)(fh % SLOTS);
    if (fh == 0 || slots[slot].fh != fh) {
        inner_read(req, ino, size, off, fi);
        return;
    }
    int fd = slots[slot].fd;
    long long start = unionfs_now_ns();
    int cached = pool_wanted ? answer_cached(req, fd, size, off) : -1;
    if (cached == 0 && unionfs_readpool_submit(req, fd, size, off, start, pool_answer)) {
        unionfs_dispatch_answered(); /* the worker replies and counts */
        return;
    }
    if (cached != 1)
        answer_read(req, fd, size, off, &main_buf);
    count_read(start);
    unionfs_dispatch_answered();
}

/*
 * A WRITE of a registered handle: one pwrite of the data, as the daemon's
 * write handler does (its result, or the errno).  A request whose data is not
 * in one memory buffer (spliced from the device) goes to pyfuse3.  Measured
 * (2026-12-04, 128 KiB writes through a fresh mount, interleaved): see
 * docs/performance.md, "WRITE in C".
 */
static void fast_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi)
{
    uint64_t fh = fi->fh;
    unsigned slot = (unsigned)(fh % SLOTS);
    const struct fuse_buf *b = &bufv->buf[0];
    if (fh == 0 || slots[slot].fh != fh || bufv->count != 1 || bufv->idx != 0 ||
        (b->flags & FUSE_BUF_IS_FD) || bufv->off > b->size) {
        inner_write_buf(req, ino, bufv, off, fi);
        return;
    }
    long long start = unionfs_now_ns();
    ssize_t n = pio_blocking(slots[slot].fd, (char *)b->mem + bufv->off, b->size - bufv->off,
                             off, 1);
    if (n < 0)
        reply_err(req, errno ? errno : EIO);
    else
        reply_write(req, (size_t)n);
    write_buckets[unionfs_bucket_since(start)]++;
    unionfs_dispatch_answered();
}

/*
 * Capabilities pyfuse3 cannot ask for, added to what its init handler wants.
 *
 * POSIX ACLs (FUSE_CAP_POSIX_ACL): the kernel then checks ACLs, not only mode
 * bits, under default_permissions, and caches them per inode.  With DONT_MASK
 * it sends the caller's umask instead of applying it, and the daemon applies
 * it unless the parent directory has a default ACL (operations.py), as a
 * local filesystem does.
 *
 * Symlink targets (FUSE_CAP_CACHE_SYMLINKS), with the listing cache: the
 * kernel keeps a target in the page cache instead of asking READLINK on every
 * path walk through the link.  A symlink's target never changes under the
 * same inode (a new target is a new symlink), so the cache stays exact.
 *
 * Splice writes (FUSE_CAP_SPLICE_WRITE), with READ in C: only fuse_reply_data
 * uses them, which only fast_read calls (pyfuse3 replies from buffers).
 *
 * No splice reads (FUSE_CAP_SPLICE_READ, which libfuse asks for by default when
 * there is a write_buf handler), with WRITE in C: where the request pipe can
 * grow to a whole request (a daemon with CAP_SYS_RESOURCE, or pipe-max-size
 * raised), the data of every WRITE of 4 KiB or more would stay in the pipe, and
 * fast_write_buf hands those to pyfuse3, which copies them out anyway.
 */
static void session_init(void *userdata, struct fuse_conn_info *conn)
{
    if (inner_init != NULL)
        inner_init(userdata, conn);
    if (acl_wanted && (conn->capable & FUSE_CAP_POSIX_ACL) &&
        (conn->capable & FUSE_CAP_DONT_MASK))
        conn->want |= FUSE_CAP_POSIX_ACL | FUSE_CAP_DONT_MASK;
    if (read_used && (conn->capable & FUSE_CAP_SPLICE_WRITE))
        conn->want |= FUSE_CAP_SPLICE_WRITE;
    if (write_used)
        conn->want &= ~FUSE_CAP_SPLICE_READ;
    if (enabled && (conn->capable & FUSE_CAP_CACHE_SYMLINKS))
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
}

static void caching_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fi->cache_readdir = 1;
    fi->keep_cache = 1;
    inner_opendir(req, ino, fi);
}

/* libfuse, as dlopen'ed by fuse_session_new (this module does not link it). */
static void *lib;

struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_fn real;
    if (real == NULL) {
        lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
        if (lib != NULL) {
            real = (session_new_fn)dlvsym(lib, "fuse_session_new", "FUSE_3.0");
            reply_buf = (int (*)(fuse_req_t, const char *, size_t))dlsym(lib, "fuse_reply_buf");
            reply_err = (int (*)(fuse_req_t, int))dlsym(lib, "fuse_reply_err");
            reply_write = (int (*)(fuse_req_t, size_t))dlsym(lib, "fuse_reply_write");
            reply_data = (int (*)(fuse_req_t, struct fuse_bufvec *,
                                  enum fuse_buf_copy_flags))dlsym(lib, "fuse_reply_data");
        }
        if (real == NULL)
            return NULL;
    }
    if ((enabled || acl_wanted || read_wanted || unionfs_dispatch_wanted()) && op != NULL &&
        op_size <= sizeof(patched)) {
        memset(&patched, 0, sizeof(patched));
        memcpy(&patched, op, op_size);
        if (enabled && op->opendir != NULL) {
            inner_opendir = op->opendir;
            patched.opendir = caching_opendir;
            used = 1;
        }
        if (read_wanted && op->read != NULL && reply_buf != NULL && reply_err != NULL) {
            inner_read = op->read;
            patched.read = fast_read;
            read_used = 1;
        }
        if (read_wanted && op->write_buf != NULL && reply_write != NULL && reply_err != NULL) {
            inner_write_buf = op->write_buf;
            patched.write_buf = fast_write_buf;
            write_used = 1;
        }
        unionfs_dispatch_patch(&patched, lib, used);
        inner_init = op->init;
        patched.init = session_init;
        op = &patched;
    }
    struct fuse_session *se = real(args, op, op_size, userdata);
    unionfs_dispatch_session(se);
    return se;
}

/*
 * Defined here for the same reason: to run first.  READs still queued for
 * _readpool.c's workers are answered before the session they reply to is
 * freed, and bursts (_dispatch.c) forget it.
 */
void fuse_session_destroy(struct fuse_session *se)
{
    static void (*real)(struct fuse_session *);
    if (real == NULL) {
        void *from = lib != NULL ? lib : dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
        if (from != NULL)
            real = (void (*)(struct fuse_session *))dlvsym(from, "fuse_session_destroy",
                                                           "FUSE_3.0");
        if (real == NULL)
            return; /* cannot happen where fuse_session_new worked: leak, not crash */
    }
    unionfs_readpool_drain();
    unionfs_dispatch_session(NULL);
    real(se);
}

static PyObject *enable(PyObject *self, PyObject *unused)
{
    enabled = 1;
    Py_RETURN_NONE;
}

static PyObject *active(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(used);
}

static PyObject *enable_acl(PyObject *self, PyObject *unused)
{
    acl_wanted = 1;
    Py_RETURN_NONE;
}

static PyObject *enable_read(PyObject *self, PyObject *args)
{
    int pool = 1;
    if (!PyArg_ParseTuple(args, "|p", &pool))
        return NULL;
    read_wanted = 1;
    pool_wanted = pool;
    long page = sysconf(_SC_PAGESIZE);
    if (page > 0)
        page_size = page;
    Py_RETURN_NONE;
}

static PyObject *read_active(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(read_used);
}

static PyObject *register_fd(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "register(fh, fd)");
        return NULL;
    }
    unsigned long long fh = PyLong_AsUnsignedLongLong(args[0]);
    long fd = PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    unsigned slot = (unsigned)(fh % SLOTS);
    if (fh == 0 || fd < 0 || fd > INT32_MAX || (slots[slot].fh != 0 && slots[slot].fh != fh))
        Py_RETURN_FALSE;
    slots[slot].fh = fh;
    slots[slot].fd = (int)fd;
    Py_RETURN_TRUE;
}

static PyObject *unregister_fd(PyObject *self, PyObject *arg)
{
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    unsigned slot = (unsigned)(fh % SLOTS);
    if (fh != 0 && slots[slot].fh == fh) {
        slots[slot].fh = 0;
        slots[slot].fd = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *clear_fds(PyObject *self, PyObject *unused)
{
    memset(slots, 0, sizeof(slots));
    Py_RETURN_NONE;
}

static PyObject *read_counts(PyObject *self, PyObject *unused)
{
    return unionfs_bucket_list(read_buckets);
}

static PyObject *write_active(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(write_used);
}

static PyObject *write_counts(PyObject *self, PyObject *unused)
{
    return unionfs_bucket_list(write_buckets);
}

static PyObject *pool_reads(PyObject *self, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(unionfs_readpool_submitted());
}

static PyMethodDef methods[] = {
    {"pool_reads", pool_reads, METH_NOARGS,
     "READs answered by worker threads so far (their data was not in the page cache)."},
    {"enable_read", enable_read, METH_VARARGS,
     "enable_read(pool=True): answer READ and WRITE of registered handles in C; with pool,"
     " READs of data not in the page cache by worker threads."},
    {"write_active", write_active, METH_NOARGS, "Did a session start with WRITE answered in C?"},
    {"write_counts", write_counts, METH_NOARGS, "Log2 ns latency buckets of WRITEs answered in C."},
    {"read_active", read_active, METH_NOARGS, "Did a session start with READ answered in C?"},
    {"register", (PyCFunction)(void (*)(void))register_fd, METH_FASTCALL,
     "register(fh, fd): READs and WRITEs of handle fh are preads and pwrites of fd; False if"
     " not taken."},
    {"unregister", unregister_fd, METH_O, "unregister(fh): before fd is closed."},
    {"clear", clear_fds, METH_NOARGS, "Forget every handle (the session ended)."},
    {"read_counts", read_counts, METH_NOARGS, "Log2 ns latency buckets of READs answered in C."},
    {"enable", enable, METH_NOARGS, "Cache directory listings in the kernel from now on."},
    {"active", active, METH_NOARGS, "Did a session start with the cache on?"},
    {"enable_acl", enable_acl, METH_NOARGS, "Ask the kernel for POSIX ACL handling."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_dircache", "Kernel directory-listing cache for pyfuse3.", -1, methods,
};

PyMODINIT_FUNC PyInit__dircache(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddFunctions(m, unionfs_dispatch_methods) < 0 ||
                      PyModule_AddFunctions(m, unionfs_prefetch_methods) < 0))
        Py_CLEAR(m);
    return m;
}
