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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <fuse_lowlevel.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static int enabled;
static int used;
static int acl_wanted;
static struct fuse_lowlevel_ops patched;
static void (*inner_opendir)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static void (*inner_init)(void *, struct fuse_conn_info *);

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
 */
static void session_init(void *userdata, struct fuse_conn_info *conn)
{
    if (inner_init != NULL)
        inner_init(userdata, conn);
    if (acl_wanted && (conn->capable & FUSE_CAP_POSIX_ACL) &&
        (conn->capable & FUSE_CAP_DONT_MASK))
        conn->want |= FUSE_CAP_POSIX_ACL | FUSE_CAP_DONT_MASK;
    if (enabled && (conn->capable & FUSE_CAP_CACHE_SYMLINKS))
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
}

static void caching_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fi->cache_readdir = 1;
    fi->keep_cache = 1;
    inner_opendir(req, ino, fi);
}

struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_fn real;
    if (real == NULL) {
        void *lib = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
        if (lib != NULL)
            real = (session_new_fn)dlvsym(lib, "fuse_session_new", "FUSE_3.0");
        if (real == NULL)
            return NULL;
    }
    if ((enabled || acl_wanted) && op != NULL && op_size <= sizeof(patched)) {
        memset(&patched, 0, sizeof(patched));
        memcpy(&patched, op, op_size);
        if (enabled && op->opendir != NULL) {
            inner_opendir = op->opendir;
            patched.opendir = caching_opendir;
            used = 1;
        }
        inner_init = op->init;
        patched.init = session_init;
        op = &patched;
    }
    return real(args, op, op_size, userdata);
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

static PyMethodDef methods[] = {
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
    return PyModule_Create(&module);
}
