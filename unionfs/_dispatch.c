/*
 * Requests dispatched to the daemon's handlers from C (part of the C session
 * helper, unionfs._dircache; see _dircache.c for how its operations table
 * takes the place of pyfuse3's).
 *
 * pyfuse3 answers each request through a Cython callback that starts a
 * coroutine (fuse_lookup_async and so on), which makes a RequestContext,
 * awaits the handler, and replies; its request loop awaits that coroutine.
 * Most of the daemon's handlers never wait for anything (operations.py:
 * they are plain functions under _guard), and for them that machinery is
 * most of the CPU a request costs: measured per request in
 * docs/performance.md, two thirds of 5-20 us.  So for the request types the
 * daemon answers most (LOOKUP, GETATTR, OPEN, RELEASE, OPENDIR, RELEASEDIR,
 * READLINK, GETXATTR, LISTXATTR, FORGET) the table's callbacks here call the
 * plain handler directly and reply from its result:
 *
 * - a result of the type the request expects is replied at once, read where
 *   pyfuse3's own callback reads it (an EntryAttributes' fuse_entry_param,
 *   a FileInfo's fields, bytes);
 * - an exception becomes its errno as _guard maps it (FUSEError and OSError
 *   carry one; anything else is logged by the daemon's callback and EIO);
 * - a coroutine (the handler's slow path must wait: a copy-up, a settle) is
 *   handed to pyfuse3: put in the daemon's hand-off list, then pyfuse3's
 *   callback for the request runs, whose coroutine reaches _guard, which
 *   awaits the handed-off coroutine instead of calling the handler again.
 *   pyfuse3's loop awaits that coroutine as soon as this callback returns, and
 *   nothing runs in between, so the list holds at most this one request's.
 *
 * Each answered request's latency goes into its type's log2 histogram, as
 * _guard counts (unionfs stats merges both).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "_session.h"

enum op {
    OP_LOOKUP,
    OP_GETATTR,
    OP_READLINK,
    OP_OPEN,
    OP_RELEASE,
    OP_OPENDIR,
    OP_RELEASEDIR,
    OP_GETXATTR,
    OP_LISTXATTR,
    OP_FORGET,
    N_OPS
};

/* The handlers' names, as operations.py defines them (and stats counts them). */
static const char *const op_names[N_OPS] = {
    "lookup", "getattr", "readlink", "open", "release", "opendir",
    "releasedir", "getxattr", "listxattr", "forget",
};

static int wanted;
static int used;
static PyObject *handlers[N_OPS];   /* plain functions, bound to the operations */
static PyObject *entry_type;        /* pyfuse3.EntryAttributes */
static PyObject *file_info_type;    /* pyfuse3.FileInfo */
static PyObject *fuse_error_type;   /* pyfuse3.FUSEError */
static PyObject *on_unexpected;     /* called (name, exception) for anything else raised */
static PyObject *reraise;           /* async function raising its argument */
static PyObject *handoff;           /* list: the coroutine handed to pyfuse3, with its name */
static PyObject *str_fh, *str_keep_cache, *str_direct_io, *str_nonseekable;
static unsigned long long buckets[N_OPS][UNIONFS_BUCKETS];

/* Where an EntryAttributes keeps its fuse_entry_param (checked by enable()). */
static Py_ssize_t entry_offset = -1;

static void (*inner_lookup)(fuse_req_t, fuse_ino_t, const char *);
static void (*inner_getattr)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_readlink)(fuse_req_t, fuse_ino_t);
static void (*inner_open)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_release)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_opendir)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_releasedir)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_getxattr)(fuse_req_t, fuse_ino_t, const char *, size_t);
static void (*inner_listxattr)(fuse_req_t, fuse_ino_t, size_t);
static int cache_dirs;

static int (*reply_err)(fuse_req_t, int);
static int (*reply_buf)(fuse_req_t, const char *, size_t);
static int (*reply_entry)(fuse_req_t, const struct fuse_entry_param *);
static int (*reply_attr)(fuse_req_t, const struct stat *, double);
static int (*reply_open)(fuse_req_t, const struct fuse_file_info *);
static int (*reply_readlink)(fuse_req_t, const char *);
static int (*reply_xattr)(fuse_req_t, size_t);
static void (*reply_none)(fuse_req_t);
static const struct fuse_ctx *(*req_ctx)(fuse_req_t);

static void count(enum op op, long long start)
{
    buckets[op][unionfs_bucket_since(start)]++;
}

/* ---- the request context ------------------------------------------------ */

/* What pyfuse3.RequestContext holds, made without pyfuse3's Python class. */
typedef struct {
    PyObject_HEAD
    unsigned int uid, gid, pid, umask;
} Context;

static PyMemberDef context_members[] = {
    {"uid", T_UINT, offsetof(Context, uid), READONLY, NULL},
    {"gid", T_UINT, offsetof(Context, gid), READONLY, NULL},
    {"pid", T_UINT, offsetof(Context, pid), READONLY, NULL},
    {"umask", T_UINT, offsetof(Context, umask), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject context_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "unionfs._dircache.RequestContext",
    .tp_basicsize = sizeof(Context),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The caller of a request dispatched in C (uid, gid, pid, umask).",
    .tp_members = context_members,
};

static PyObject *context_of(fuse_req_t req)
{
    Context *c = PyObject_New(Context, &context_type);
    if (c == NULL)
        return NULL;
    const struct fuse_ctx *fc = req_ctx(req);
    c->uid = fc->uid;
    c->gid = fc->gid;
    c->pid = (unsigned int)fc->pid;
    c->umask = fc->umask;
    return (PyObject *)c;
}

/* ---- calling a handler and reading what it returned ----------------------- */

/* The errno of the exception raised (cleared), as _guard maps it. */
static int raised_errno(enum op op)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    int err = 0;
    if (value != NULL && (PyErr_GivenExceptionMatches(type, PyExc_OSError) ||
                          PyErr_GivenExceptionMatches(type, fuse_error_type))) {
        PyObject *n = PyObject_GetAttrString(value, "errno");
        if (n != NULL && PyLong_Check(n))
            err = (int)PyLong_AsLong(n);
        Py_XDECREF(n);
        PyErr_Clear();
    } else if (value != NULL) {
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        PyObject *r = PyObject_CallFunction(on_unexpected, "sO", op_names[op], value);
        if (r == NULL)
            PyErr_Clear();
        Py_XDECREF(r);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return err > 0 ? err : EIO;
}

/* Report a result of the wrong type as _guard reports anything unexpected. */
static int wrong_result(enum op op, PyObject *result)
{
    PyErr_Format(PyExc_TypeError, "handler returned %R", (PyObject *)Py_TYPE(result));
    Py_DECREF(result);
    return raised_errno(op);
}

/*
 * The hand-off list is empty whenever a callback starts: its item is taken as
 * soon as pyfuse3 runs the request's coroutine.  If pyfuse3's callback failed
 * before making that coroutine (it has no way to report it), the item would
 * wait for the next request of that type: drop it, with the handler's own
 * coroutine (never started, so nothing is half done).
 */
static void drop_stale_handoff(void)
{
    if (PyList_GET_SIZE(handoff) == 0)
        return;
    PyObject *r = PyObject_CallFunction(on_unexpected, "sO", "hand-off",
                                        PyList_GET_ITEM(handoff, 0));
    Py_XDECREF(r);
    PyErr_Clear();
    PyList_SetSlice(handoff, 0, PY_SSIZE_T_MAX, NULL);
    PyErr_Clear();
}

/*
 * Not an Exception (SystemExit, KeyboardInterrupt): _guard lets these
 * through, and so must this: they go on as a coroutine that raises them,
 * handed to pyfuse3 like any other.  Returns that coroutine, or NULL (with the
 * exception set again) if this is an ordinary exception.
 */
static PyObject *reraiser(void)
{
    if (PyErr_ExceptionMatches(PyExc_Exception) || reraise == NULL)
        return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *coro = value != NULL ? PyObject_CallOneArg(reraise, value) : NULL;
    if (coro == NULL) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return coro;
}

/* Call a handler: args are stolen (NULL ones mean a failed conversion). */
static PyObject *call(enum op op, PyObject **args, size_t nargs)
{
    PyObject *result = NULL;
    size_t i;
    drop_stale_handoff();
    for (i = 0; i < nargs; i++)
        if (args[i] == NULL)
            break;
    if (i == nargs)
        result = PyObject_Vectorcall(handlers[op], args, nargs, NULL);
    for (i = 0; i < nargs; i++)
        Py_XDECREF(args[i]);
    if (result == NULL && op != OP_FORGET)
        result = reraiser(); /* NULL again for an ordinary exception */
    return result;
}

/* Hand a coroutine to pyfuse3 (see the top of this file); False if it could not be. */
static int hand_off(enum op op, PyObject *coro)
{
    PyObject *item = Py_BuildValue("(sO)", op_names[op], coro);
    Py_DECREF(coro);
    if (item == NULL || PyList_Append(handoff, item) < 0) {
        Py_XDECREF(item);
        return 0;
    }
    Py_DECREF(item);
    return 1;
}

/*
 * If the handler returned a coroutine (its slow path must wait): hand it to
 * pyfuse3 and return 1, for the caller to run pyfuse3's own callback; -1 if
 * it could not be handed (replied with an error); 0 if r is no coroutine.
 */
static int hand_off_coroutine(enum op op, PyObject *r, fuse_req_t req)
{
    if (r == NULL || !PyCoro_CheckExact(r))
        return 0;
    if (hand_off(op, r))
        return 1;
    reply_err(req, raised_errno(op));
    return -1;
}

static struct fuse_entry_param *entry_param(PyObject *entry)
{
    return (struct fuse_entry_param *)((char *)entry + entry_offset);
}

static int is_entry(PyObject *r)
{
    return Py_TYPE(r) == (PyTypeObject *)entry_type;
}

/* ---- bursts: the next requests read here ------------------------------------ */

/*
 * A request answered here returns to pyfuse3's loop, which goes through trio
 * (its reader lock, the wait for the descriptor: unionfs/loop.py) before it
 * reads the next one: a few microseconds of Python per request.  So after a
 * request answered here, the next ones are read and processed here too, for
 * as long as they come within spin_ns of each other (a client in a loop sends
 * its next request within microseconds) or, waiting blocked, within wait_ms
 * (loop.py's own blocking wait outside trio), up to BURST_MAX of them.  The
 * burst ends, back to pyfuse3's loop:
 * - when a request is not answered here (another type, or a hand-off):
 *   pyfuse3's callback has left a coroutine that its loop awaits as soon as
 *   the outer callback returns, and a second one would overwrite it;
 * - when trio's wake-up descriptor is readable (a worker thread finished, a
 *   signal came: trio has work), or nothing came in time;
 * - when trio has a task ready to run (a handler woke it: a lock released, an
 *   event set), asked every PROBE_EVERY requests (loop.py's probe);
 * - after BURST_MAX requests, so that trio's other tasks run at least that
 *   often.
 * The wait releases the GIL, so trio's worker threads (a copy-up's data) run.
 */
#define BURST_MAX 64
/* Every this many requests of a burst, ask trio whether a task is ready. */
#define PROBE_EVERY 8

static struct fuse_session *session;
static int (*receive_buf)(struct fuse_session *, struct fuse_buf *);
static void (*process_buf)(struct fuse_session *, const struct fuse_buf *);
static int (*session_fd)(struct fuse_session *);
static int (*session_exited)(struct fuse_session *);
static PyObject *others_ready; /* loop.py's: has trio a task to run? (or NULL) */
static struct fuse_buf burst_buf;
static long long spin_ns;       /* 0: no bursts */
static int wait_ms;             /* then a blocking wait of this long */
static int wakeup_fd = -1;      /* trio's wake-up socket, or -1 */
static int in_burst;
static int answered;            /* the request just processed was answered here */
static int spun_out;            /* the last burst ended because nothing came in time */
static unsigned long long burst_requests, bursts;

static int trio_has_work(void)
{
    if (others_ready == NULL)
        return 0;
    PyObject *r = PyObject_CallNoArgs(others_ready);
    int yes = r == NULL ? 1 : PyObject_IsTrue(r); /* an error: let trio run */
    Py_XDECREF(r);
    PyErr_Clear();
    return yes != 0;
}

/* One poll of the FUSE descriptor and trio's: 1 a request, 0 none, -1 trio has work. */
static int poll_request(struct pollfd *fds, nfds_t n, int timeout_ms)
{
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = poll(fds, n, timeout_ms);
    Py_END_ALLOW_THREADS
    if (r == 0)
        return 0;
    if (r < 0 || (n == 2 && fds[1].revents) || !(fds[0].revents & POLLIN))
        return -1; /* a signal, trio's wake-up, or the descriptor closed: pyfuse3's loop sees */
    return 1;
}

/*
 * Wait for the next request: busy for up to spin_ns (a client in a loop sends
 * it within microseconds; waking a sleeping thread costs more than most
 * requests), then, unless trio has a task to run, blocking for up to wait_ms
 * as loop.py's waiter would (a client that computes between its requests).
 * 1 if a request is there, 0 if not.
 */
static int next_request(int fd)
{
    struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = wakeup_fd, .events = POLLIN}};
    nfds_t n = wakeup_fd >= 0 ? 2 : 1;
    int r = 0;
    long long end = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        int p = poll(fds, n, 0);
        if (p != 0) {
            r = p > 0 && (fds[0].revents & POLLIN) && !(n == 2 && fds[1].revents) ? 1 : -1;
            break;
        }
        long long now = unionfs_now_ns();
        if (end == 0)
            end = now + spin_ns;
        else if (now >= end)
            break;
    }
    Py_END_ALLOW_THREADS
    if (r == 0 && wait_ms > 0 && !trio_has_work())
        r = poll_request(fds, n, wait_ms);
    if (r == 0)
        spun_out = 1;
    return r == 1;
}

static void burst(void)
{
    if (spin_ns <= 0 || in_burst || session == NULL)
        return;
    in_burst = 1;
    spun_out = 0;
    bursts++;
    int fd = session_fd(session);
    for (int i = 0; i < BURST_MAX && !session_exited(session) && next_request(fd); i++) {
        if (i % PROBE_EVERY == PROBE_EVERY - 1 && trio_has_work())
            break;
        int res;
        Py_BEGIN_ALLOW_THREADS
        res = receive_buf(session, &burst_buf);
        Py_END_ALLOW_THREADS
        if (res <= 0) /* interrupted, or the session ended: pyfuse3's loop sees it */
            break;
        answered = 0;
        burst_requests++;
        process_buf(session, &burst_buf);
        if (!answered)
            break;
    }
    in_burst = 0;
}

/* A request was answered here: note it, then go on with the next ones. */
static void done(enum op op, long long start)
{
    count(op, start);
    answered = 1;
    burst();
}

void unionfs_dispatch_session(struct fuse_session *se)
{
    /* libfuse sizes a buffer for its session once (when mem is NULL). */
    free(burst_buf.mem);
    memset(&burst_buf, 0, sizeof(burst_buf));
    session = se;
}

void unionfs_dispatch_answered(void)
{
    answered = 1;
    if (PyGILState_Check()) /* as every callback is called, by pyfuse3's loop */
        burst();
}

/* ---- the callbacks ---------------------------------------------------------- */

/*
 * Each runs in the thread of pyfuse3's loop, which holds the GIL while
 * libfuse calls it; Ensure/Release are there all the same, as for any
 * callback from C.  A reply is sent exactly once on every path.
 */

static void fast_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long start = unionfs_now_ns();
    PyObject *args[] = {PyLong_FromUnsignedLongLong(parent), PyBytes_FromString(name),
                        context_of(req)};
    PyObject *r = call(OP_LOOKUP, args, 3);
    int handed = hand_off_coroutine(OP_LOOKUP, r, req);
    if (handed > 0)
        inner_lookup(req, parent, name);
    else if (handed == 0) {
        if (r == NULL)
            reply_err(req, raised_errno(OP_LOOKUP));
        else if (!is_entry(r))
            reply_err(req, wrong_result(OP_LOOKUP, r));
        else {
            reply_entry(req, entry_param(r));
            Py_DECREF(r);
        }
        done(OP_LOOKUP, start);
    }
    PyGILState_Release(g);
}

static void fast_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long start = unionfs_now_ns();
    PyObject *args[] = {PyLong_FromUnsignedLongLong(ino), context_of(req)};
    PyObject *r = call(OP_GETATTR, args, 2);
    int handed = hand_off_coroutine(OP_GETATTR, r, req);
    if (handed > 0)
        inner_getattr(req, ino, fi);
    else if (handed == 0) {
        if (r == NULL)
            reply_err(req, raised_errno(OP_GETATTR));
        else if (!is_entry(r))
            reply_err(req, wrong_result(OP_GETATTR, r));
        else {
            struct fuse_entry_param *e = entry_param(r);
            reply_attr(req, &e->attr, e->attr_timeout);
            Py_DECREF(r);
        }
        done(OP_GETATTR, start);
    }
    PyGILState_Release(g);
}

static void fast_readlink(fuse_req_t req, fuse_ino_t ino)
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long start = unionfs_now_ns();
    PyObject *args[] = {PyLong_FromUnsignedLongLong(ino), context_of(req)};
    PyObject *r = call(OP_READLINK, args, 2);
    int handed = hand_off_coroutine(OP_READLINK, r, req);
    if (handed > 0)
        inner_readlink(req, ino);
    else if (handed == 0) {
        if (r == NULL)
            reply_err(req, raised_errno(OP_READLINK));
        else if (!PyBytes_Check(r))
            reply_err(req, wrong_result(OP_READLINK, r));
        else {
            reply_readlink(req, PyBytes_AS_STRING(r));
            Py_DECREF(r);
        }
        done(OP_READLINK, start);
    }
    PyGILState_Release(g);
}

/* Copy a FileInfo's fields into fi, as pyfuse3's _copy_to_fuse does. */
static int file_info_into(PyObject *info, struct fuse_file_info *fi)
{
    PyObject *fh = PyObject_GetAttr(info, str_fh);
    PyObject *keep = fh ? PyObject_GetAttr(info, str_keep_cache) : NULL;
    PyObject *direct = keep ? PyObject_GetAttr(info, str_direct_io) : NULL;
    PyObject *nonseek = direct ? PyObject_GetAttr(info, str_nonseekable) : NULL;
    int ok = 0;
    unsigned long long n = nonseek != NULL ? PyLong_AsUnsignedLongLong(fh) : 0;
    if (nonseek != NULL && !PyErr_Occurred()) {
        int k = PyObject_IsTrue(keep), d = PyObject_IsTrue(direct), s = PyObject_IsTrue(nonseek);
        if (k >= 0 && d >= 0 && s >= 0) {
            fi->fh = n;
            fi->keep_cache = k;
            fi->direct_io = d;
            fi->nonseekable = s;
            ok = 1;
        }
    }
    Py_XDECREF(fh);
    Py_XDECREF(keep);
    Py_XDECREF(direct);
    Py_XDECREF(nonseek);
    return ok;
}

static void fast_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long start = unionfs_now_ns();
    PyObject *args[] = {PyLong_FromUnsignedLongLong(ino), PyLong_FromLong(fi->flags),
                        context_of(req)};
    PyObject *r = call(OP_OPEN, args, 3);
    int handed = hand_off_coroutine(OP_OPEN, r, req);
    if (handed > 0)
        inner_open(req, ino, fi);
    else if (handed == 0) {
        if (r == NULL)
            reply_err(req, raised_errno(OP_OPEN));
        else if (Py_TYPE(r) != (PyTypeObject *)file_info_type)
            reply_err(req, wrong_result(OP_OPEN, r));
        else {
            struct fuse_file_info out = *fi;
            int ok = file_info_into(r, &out);
            Py_DECREF(r);
            /* A handle the reply cannot carry is still open: the kernel never
             * sees it, so it is never released (as in pyfuse3, whose
             * conversion cannot fail for a FileInfo). */
            if (ok)
                reply_open(req, &out);
            else
                reply_err(req, raised_errno(OP_OPEN));
        }
        done(OP_OPEN, start);
    }
    PyGILState_Release(g);
}

/* RELEASE and RELEASEDIR: the handler takes the handle number, the reply is 0. */
static void release_common(enum op op, fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                           void (*inner)(fuse_req_t, fuse_ino_t, struct fuse_file_info *))
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long start = unionfs_now_ns();
    PyObject *args[] = {PyLong_FromUnsignedLongLong(fi->fh)};
    PyObject *r = call(op, args, 1);
    int handed = hand_off_coroutine(op, r, req);
    if (handed > 0)
        inner(req, ino, fi);
    else if (handed == 0) {
        if (r == NULL)
            reply_err(req, raised_errno(op));
        else {
            reply_err(req, 0);
            Py_DECREF(r);
        }
        done(op, start);
    }
    PyGILState_Release(g);
}

static void fast_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    release_common(OP_RELEASE, req, ino, fi, inner_release);
}

static void fast_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    release_common(OP_RELEASEDIR, req, ino, fi, inner_releasedir);
}

static void fast_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long start = unionfs_now_ns();
    PyObject *args[] = {PyLong_FromUnsignedLongLong(ino), context_of(req)};
    PyObject *r = call(OP_OPENDIR, args, 2);
    int handed = hand_off_coroutine(OP_OPENDIR, r, req);
    if (handed > 0)
        inner_opendir(req, ino, fi);
    else if (handed == 0) {
        if (r == NULL)
            reply_err(req, raised_errno(OP_OPENDIR));
        else if (!PyLong_Check(r))
            reply_err(req, wrong_result(OP_OPENDIR, r));
        else {
            unsigned long long fh = PyLong_AsUnsignedLongLong(r);
            Py_DECREF(r);
            if (PyErr_Occurred())
                reply_err(req, raised_errno(OP_OPENDIR));
            else {
                struct fuse_file_info out = *fi;
                out.fh = fh;
                if (cache_dirs) { /* as _dircache.c's caching_opendir */
                    out.cache_readdir = 1;
                    out.keep_cache = 1;
                }
                reply_open(req, &out);
            }
        }
        done(OP_OPENDIR, start);
    }
    PyGILState_Release(g);
}

/* The reply to GETXATTR or LISTXATTR of a value: its size, itself, or ERANGE. */
static void reply_value(fuse_req_t req, const char *data, size_t len, size_t size)
{
    if (size == 0)
        reply_xattr(req, len);
    else if (len <= size)
        reply_buf(req, data, len);
    else
        reply_err(req, ERANGE);
}

static void fast_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long start = unionfs_now_ns();
    PyObject *args[] = {PyLong_FromUnsignedLongLong(ino), PyBytes_FromString(name),
                        context_of(req)};
    PyObject *r = call(OP_GETXATTR, args, 3);
    int handed = hand_off_coroutine(OP_GETXATTR, r, req);
    if (handed > 0)
        inner_getxattr(req, ino, name, size);
    else if (handed == 0) {
        if (r == NULL)
            reply_err(req, raised_errno(OP_GETXATTR));
        else if (!PyBytes_Check(r))
            reply_err(req, wrong_result(OP_GETXATTR, r));
        else {
            reply_value(req, PyBytes_AS_STRING(r), (size_t)PyBytes_GET_SIZE(r), size);
            Py_DECREF(r);
        }
        done(OP_GETXATTR, start);
    }
    PyGILState_Release(g);
}

/* Names joined as LISTXATTR replies them: each followed by a NUL. */
static PyObject *joined_names(PyObject *names)
{
    PyObject *seq = PySequence_Fast(names, "listxattr must return a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), total = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(items[i])) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "listxattr must return bytes");
            return NULL;
        }
        total += PyBytes_GET_SIZE(items[i]) + 1;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out != NULL) {
        char *p = PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t len = PyBytes_GET_SIZE(items[i]);
            memcpy(p, PyBytes_AS_STRING(items[i]), (size_t)len);
            p += len;
            *p++ = '\0';
        }
    }
    Py_DECREF(seq);
    return out;
}

static void fast_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long start = unionfs_now_ns();
    PyObject *args[] = {PyLong_FromUnsignedLongLong(ino), context_of(req)};
    PyObject *r = call(OP_LISTXATTR, args, 2);
    int handed = hand_off_coroutine(OP_LISTXATTR, r, req);
    if (handed > 0)
        inner_listxattr(req, ino, size);
    else if (handed == 0) {
        PyObject *joined = r == NULL ? NULL : joined_names(r);
        Py_XDECREF(r);
        if (joined == NULL)
            reply_err(req, raised_errno(OP_LISTXATTR));
        else {
            size_t len = (size_t)PyBytes_GET_SIZE(joined);
            /* As pyfuse3: a lone NUL (one empty name) is no name at all. */
            reply_value(req, PyBytes_AS_STRING(joined), len == 1 ? 0 : len, size);
            Py_DECREF(joined);
        }
        done(OP_LISTXATTR, start);
    }
    PyGILState_Release(g);
}

/* FORGET and BATCH_FORGET: the handler takes [(inode, count), ...]; no reply but "none". */
static void forget_list(fuse_req_t req, PyObject *list)
{
    long long start = unionfs_now_ns();
    PyObject *args[] = {list};
    PyObject *r = call(OP_FORGET, args, 1);
    if (r == NULL)
        raised_errno(OP_FORGET); /* logged; a forget has no error to reply */
    Py_XDECREF(r);
    reply_none(req);
    done(OP_FORGET, start);
}

static PyObject *forget_pair(fuse_ino_t ino, uint64_t nlookup)
{
    return Py_BuildValue("(KK)", (unsigned long long)ino, (unsigned long long)nlookup);
}

static void fast_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *pair = forget_pair(ino, nlookup);
    PyObject *list = pair ? PyList_New(1) : NULL;
    if (list != NULL)
        PyList_SET_ITEM(list, 0, pair);
    else
        Py_XDECREF(pair);
    forget_list(req, list);
    PyGILState_Release(g);
}

static void fast_forget_multi(fuse_req_t req, size_t n, struct fuse_forget_data *forgets)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *pair = forget_pair(forgets[i].ino, forgets[i].nlookup);
        if (pair == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, pair);
    }
    forget_list(req, list);
    PyGILState_Release(g);
}

/* ---- the table -------------------------------------------------------------- */

int unionfs_dispatch_wanted(void)
{
    return wanted;
}

int unionfs_dispatch_patch(struct fuse_lowlevel_ops *table, void *libfuse, int dirs_cached)
{
    if (!wanted)
        return 0;
    reply_err = (int (*)(fuse_req_t, int))dlsym(libfuse, "fuse_reply_err");
    reply_buf = (int (*)(fuse_req_t, const char *, size_t))dlsym(libfuse, "fuse_reply_buf");
    reply_entry = (int (*)(fuse_req_t, const struct fuse_entry_param *))dlsym(
        libfuse, "fuse_reply_entry");
    reply_attr = (int (*)(fuse_req_t, const struct stat *, double))dlsym(libfuse,
                                                                          "fuse_reply_attr");
    reply_open = (int (*)(fuse_req_t, const struct fuse_file_info *))dlsym(libfuse,
                                                                            "fuse_reply_open");
    reply_readlink = (int (*)(fuse_req_t, const char *))dlsym(libfuse, "fuse_reply_readlink");
    reply_xattr = (int (*)(fuse_req_t, size_t))dlsym(libfuse, "fuse_reply_xattr");
    reply_none = (void (*)(fuse_req_t))dlsym(libfuse, "fuse_reply_none");
    req_ctx = (const struct fuse_ctx *(*)(fuse_req_t))dlsym(libfuse, "fuse_req_ctx");
    receive_buf = (int (*)(struct fuse_session *, struct fuse_buf *))dlsym(
        libfuse, "fuse_session_receive_buf");
    process_buf = (void (*)(struct fuse_session *, const struct fuse_buf *))dlsym(
        libfuse, "fuse_session_process_buf");
    session_fd = (int (*)(struct fuse_session *))dlsym(libfuse, "fuse_session_fd");
    session_exited = (int (*)(struct fuse_session *))dlsym(libfuse, "fuse_session_exited");
    if (!reply_err || !reply_buf || !reply_entry || !reply_attr || !reply_open ||
        !reply_readlink || !reply_xattr || !reply_none || !req_ctx || !receive_buf ||
        !process_buf || !session_fd || !session_exited)
        return 0;
    /* Only callbacks pyfuse3 set (every one, in the versions known) are taken over:
     * each needs the original for the hand-off. */
    if (!table->lookup || !table->getattr || !table->readlink || !table->open ||
        !table->release || !table->opendir || !table->releasedir || !table->getxattr ||
        !table->listxattr || !table->forget || !table->forget_multi)
        return 0;
    cache_dirs = dirs_cached;
    inner_lookup = table->lookup;
    inner_getattr = table->getattr;
    inner_readlink = table->readlink;
    inner_open = table->open;
    inner_release = table->release;
    inner_opendir = table->opendir;
    inner_releasedir = table->releasedir;
    inner_getxattr = table->getxattr;
    inner_listxattr = table->listxattr;
    table->lookup = fast_lookup;
    table->getattr = fast_getattr;
    table->readlink = fast_readlink;
    table->open = fast_open;
    table->release = fast_release;
    table->opendir = fast_opendir;
    table->releasedir = fast_releasedir;
    table->getxattr = fast_getxattr;
    table->listxattr = fast_listxattr;
    table->forget = fast_forget;
    table->forget_multi = fast_forget_multi;
    used = 1;
    return 1;
}

/* ---- the Python side ---------------------------------------------------------- */

/*
 * Find the fuse_entry_param in an EntryAttributes: pyfuse3 declares it as the
 * class's first field, so it sits right after the object header, aligned.
 * A sample made by the caller, with known values, must read back exactly;
 * otherwise this pyfuse3 lays it out differently and nothing is dispatched.
 */
static int entry_layout_ok(PyObject *sample)
{
    Py_ssize_t align = _Alignof(struct fuse_entry_param);
    Py_ssize_t off = ((Py_ssize_t)sizeof(PyObject) + align - 1) / align * align;
    if (Py_TYPE(sample)->tp_basicsize < off + (Py_ssize_t)sizeof(struct fuse_entry_param))
        return 0;
    struct fuse_entry_param *e = (struct fuse_entry_param *)((char *)sample + off);
    if (e->ino != 0x1234567 || e->attr.st_ino != 0x1234567 || e->attr.st_size != 0x7654321 ||
        e->attr.st_mode != 0100640 || e->attr_timeout != 1.5 || e->entry_timeout != 2.5)
        return 0;
    entry_offset = off;
    return 1;
}

static PyObject *enable_dispatch(PyObject *self, PyObject *args)
{
    PyObject *table, *sample, *info_type, *error_type, *unexpected, *list, *raiser;
    if (!PyArg_ParseTuple(args, "O!OOOOO!O", &PyDict_Type, &table, &sample, &info_type,
                          &error_type, &unexpected, &PyList_Type, &list, &raiser))
        return NULL;
    if (PyType_Ready(&context_type) < 0)
        return NULL;
    if (!entry_layout_ok(sample))
        Py_RETURN_FALSE;
    PyObject *found[N_OPS];
    for (int i = 0; i < N_OPS; i++) {
        found[i] = PyDict_GetItemString(table, op_names[i]);
        if (found[i] == NULL || !PyCallable_Check(found[i])) {
            PyErr_Format(PyExc_ValueError, "no handler for %s", op_names[i]);
            return NULL;
        }
    }
    for (int i = 0; i < N_OPS; i++) {
        Py_INCREF(found[i]);
        Py_XSETREF(handlers[i], found[i]);
    }
    Py_INCREF(Py_TYPE(sample));
    Py_XSETREF(entry_type, (PyObject *)Py_TYPE(sample));
    Py_INCREF(info_type);
    Py_XSETREF(file_info_type, info_type);
    Py_INCREF(error_type);
    Py_XSETREF(fuse_error_type, error_type);
    Py_INCREF(unexpected);
    Py_XSETREF(on_unexpected, unexpected);
    Py_INCREF(list);
    Py_XSETREF(handoff, list);
    Py_INCREF(raiser);
    Py_XSETREF(reraise, raiser);
    if (!str_fh) {
        str_fh = PyUnicode_InternFromString("fh");
        str_keep_cache = PyUnicode_InternFromString("keep_cache");
        str_direct_io = PyUnicode_InternFromString("direct_io");
        str_nonseekable = PyUnicode_InternFromString("nonseekable");
    }
    wanted = 1;
    Py_RETURN_TRUE;
}

/*
 * An EntryAttributes made from an os.stat_result, as operations.py's _attrs
 * makes it with pyfuse3's property setters (about 17 of them, each a Python
 * call, per reply and per listed entry), here written straight into its
 * fuse_entry_param.  The stat_result's fields are read by index: where each
 * one is was found by entry_fields() (os.stat_result's layout is CPython's
 * and the platform's).  Times as pyfuse3 splits them (floor division).
 */
enum { F_MODE, F_UID, F_GID, F_SIZE, F_ATIME, F_MTIME, F_CTIME, F_BLOCKS, F_RDEV, N_FIELDS };
static Py_ssize_t field_index[N_FIELDS];
static PyTypeObject *stat_type; /* os.stat_result, once entry_fields() checked it */

static int split_ns(PyObject *v, struct timespec *ts)
{
    long long ns = PyLong_AsLongLong(v);
    if (ns == -1 && PyErr_Occurred())
        return 0;
    long long sec = ns / 1000000000LL, rem = ns % 1000000000LL;
    if (rem < 0) {
        rem += 1000000000LL;
        sec -= 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
    return 1;
}

static PyObject *entry_attributes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "entry_attributes(st, ino, nlink, blksize, entry_timeout, attr_timeout)");
        return NULL;
    }
    PyObject *st = args[0];
    if (stat_type == NULL || entry_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "entry_fields() and enable_entries() first");
        return NULL;
    }
    if (Py_TYPE(st) != stat_type) {
        PyErr_SetString(PyExc_TypeError, "not an os.stat_result");
        return NULL;
    }
    PyObject *e = PyObject_CallNoArgs(entry_type);
    if (e == NULL)
        return NULL;
    struct fuse_entry_param *p = entry_param(e);
    /* A structseq is a tuple whose hidden fields follow the visible ones. */
    PyObject **item = ((PyTupleObject *)st)->ob_item;
    unsigned long long ino = PyLong_AsUnsignedLongLong(args[1]);
    p->ino = ino;
    p->attr.st_ino = ino;
    p->attr.st_nlink = PyLong_AsUnsignedLong(args[2]);
    p->attr.st_blksize = PyLong_AsLong(args[3]);
    p->entry_timeout = PyFloat_AsDouble(args[4]);
    p->attr_timeout = PyFloat_AsDouble(args[5]);
    p->attr.st_mode = PyLong_AsUnsignedLong(item[field_index[F_MODE]]);
    p->attr.st_uid = PyLong_AsUnsignedLong(item[field_index[F_UID]]);
    p->attr.st_gid = PyLong_AsUnsignedLong(item[field_index[F_GID]]);
    p->attr.st_size = PyLong_AsLongLong(item[field_index[F_SIZE]]);
    p->attr.st_blocks = PyLong_AsLongLong(item[field_index[F_BLOCKS]]);
    p->attr.st_rdev = PyLong_AsUnsignedLongLong(item[field_index[F_RDEV]]);
    if (PyErr_Occurred() || !split_ns(item[field_index[F_ATIME]], &p->attr.st_atim) ||
        !split_ns(item[field_index[F_MTIME]], &p->attr.st_mtim) ||
        !split_ns(item[field_index[F_CTIME]], &p->attr.st_ctim)) {
        Py_DECREF(e);
        return NULL;
    }
    return e;
}

/*
 * entry_fields(os.stat_result, indices): where st_mode, st_uid, st_gid,
 * st_size, st_atime_ns, st_mtime_ns, st_ctime_ns, st_blocks and st_rdev sit
 * in it, each below its n_fields (hidden fields included).
 */
static PyObject *entry_fields(PyObject *self, PyObject *args)
{
    PyObject *type, *indices;
    if (!PyArg_ParseTuple(args, "O!O", &PyType_Type, &type, &indices))
        return NULL;
    PyObject *n = PyObject_GetAttrString(type, "n_fields");
    Py_ssize_t n_fields = n != NULL ? PyLong_AsSsize_t(n) : -1;
    Py_XDECREF(n);
    PyObject *seq = n_fields > 0 ? PySequence_Fast(indices, "a sequence of indices") : NULL;
    if (seq == NULL)
        return NULL;
    Py_ssize_t found[N_FIELDS];
    int ok = PySequence_Fast_GET_SIZE(seq) == N_FIELDS &&
             PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type);
    for (int f = 0; ok && f < N_FIELDS; f++) {
        found[f] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, f));
        ok = found[f] >= 0 && found[f] < n_fields;
    }
    Py_DECREF(seq);
    if (!ok) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "not the fields of a stat_result");
        return NULL;
    }
    memcpy(field_index, found, sizeof(found));
    Py_INCREF(type);
    Py_XSETREF(stat_type, (PyTypeObject *)type);
    Py_RETURN_NONE;
}

/* enable_entries(sample): check the EntryAttributes layout (as enable_dispatch). */
static PyObject *enable_entries(PyObject *self, PyObject *sample)
{
    if (!entry_layout_ok(sample))
        Py_RETURN_FALSE;
    Py_INCREF(Py_TYPE(sample));
    Py_XSETREF(entry_type, (PyObject *)Py_TYPE(sample));
    Py_RETURN_TRUE;
}

static PyObject *dispatch_active(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(used);
}

static PyObject *dispatch_counts(PyObject *self, PyObject *name)
{
    const char *s = PyUnicode_AsUTF8(name);
    if (s == NULL)
        return NULL;
    for (int op = 0; op < N_OPS; op++) {
        if (strcmp(s, op_names[op]) != 0)
            continue;
        return unionfs_bucket_list(buckets[op]);
    }
    PyErr_Format(PyExc_KeyError, "%R", name);
    return NULL;
}

PyObject *unionfs_bucket_list(const unsigned long long *counts)
{
    PyObject *out = PyList_New(UNIONFS_BUCKETS);
    for (int b = 0; out != NULL && b < UNIONFS_BUCKETS; b++) {
        PyObject *n = PyLong_FromUnsignedLongLong(
            __atomic_load_n(&counts[b], __ATOMIC_RELAXED)); /* READ's are bumped by workers */
        if (n == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, b, n);
    }
    return out;
}

static PyObject *dispatched(PyObject *self, PyObject *unused)
{
    PyObject *out = PyTuple_New(N_OPS);
    for (int op = 0; out != NULL && op < N_OPS; op++) {
        PyObject *s = PyUnicode_FromString(op_names[op]);
        if (s == NULL)
            Py_CLEAR(out);
        else
            PyTuple_SET_ITEM(out, op, s);
    }
    return out;
}

static PyObject *set_burst(PyObject *self, PyObject *args)
{
    long long spin_us;
    int fd, wait = 0;
    PyObject *probe = Py_None;
    if (!PyArg_ParseTuple(args, "Li|Oi", &spin_us, &fd, &probe, &wait))
        return NULL;
    spin_ns = spin_us > 0 ? spin_us * 1000 : 0;
    wait_ms = wait > 0 ? wait : 0;
    wakeup_fd = fd;
    Py_XSETREF(others_ready, probe == Py_None ? NULL : Py_NewRef(probe));
    Py_RETURN_NONE;
}

static PyObject *burst_spun_out(PyObject *self, PyObject *unused)
{
    int was = spun_out;
    spun_out = 0;
    return PyBool_FromLong(was);
}

static PyObject *burst_counts(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{sKsK}", "bursts", bursts, "requests", burst_requests);
}

PyMethodDef unionfs_dispatch_methods[] = {
    {"entry_attributes", (PyCFunction)(void (*)(void))entry_attributes, METH_FASTCALL,
     "entry_attributes(st, ino, nlink, blksize, entry_timeout, attr_timeout): an"
     " EntryAttributes of an os.stat_result."},
    {"entry_fields", entry_fields, METH_VARARGS,
     "entry_fields(os.stat_result, indices): where it keeps the fields used."},
    {"enable_entries", enable_entries, METH_O,
     "enable_entries(sample): True if EntryAttributes can be made here (see enable_dispatch)."},
    {"set_burst", set_burst, METH_VARARGS,
     "set_burst(spin_us, wakeup_fd, others_ready=None, wait_ms=0): after a request answered"
     " in C, read the next ones in C while they come within spin_us (0: never), then within"
     " a blocking wait of wait_ms; wakeup_fd (trio's, or -1) readable or others_ready() true"
     " ends a burst."},
    {"burst_spun_out", burst_spun_out, METH_NOARGS,
     "Did the last burst end because no request came within spin_us? (Cleared.)"},
    {"burst_counts", burst_counts, METH_NOARGS, "Bursts so far, and the requests read in them."},
    {"enable_dispatch", enable_dispatch, METH_VARARGS,
     "enable_dispatch(handlers, entry_sample, FileInfo, FUSEError, on_unexpected, handoff,"
     " reraise): answer the request types of dispatched() by calling handlers[name] from C."
     " False if this pyfuse3's EntryAttributes is not laid out as expected."},
    {"dispatch_active", dispatch_active, METH_NOARGS,
     "Did a session start with requests dispatched in C?"},
    {"dispatch_counts", dispatch_counts, METH_O,
     "Log2 ns latency buckets of one request type answered in C."},
    {"dispatched", dispatched, METH_NOARGS, "The request types dispatched in C."},
    {NULL, NULL, 0, NULL},
};
