/*
 * Metadata read ahead of a client that walks cold directories (part of the C
 * session helper, unionfs._dircache).
 *
 * A LOOKUP whose fstatat waits for the disk holds the daemon's one thread for
 * the disk's latency, and the client that walks a tree (find, git status, a
 * backup, a stat of every file) sends its next LOOKUP only once that one is
 * answered: every read of a directory block or an inode is on the critical
 * path, one after the other.  Kernel overlayfs pays that chain too, but each
 * link costs it one wake-up; through FUSE it costs a sleeping daemon's and a
 * sleeping client's, and a cold stat of 22,600 paths took 2.2 s against
 * 0.6 s, with the same 6,000 disk reads taking the same 0.4 s of device time
 * (docs/performance.md).  fuse-overlayfs reads a whole directory at its first
 * lookup, which takes most of that chain off the critical path.
 *
 * Here, when a lookup's fstatat in a layer's directory was slow (the daemon
 * measures it: the directory is cold), a worker thread reads that directory
 * ahead: it lists it, lstats each entry (its inode), and lists each
 * subdirectory (its blocks), which is what the client's next lookups will
 * need.  The results are thrown away: they only fill the kernel's caches, so
 * the daemon's own system calls then find the data there.  A worker never
 * touches the daemon's state, never follows a symbolic link (fstatat with
 * AT_SYMLINK_NOFOLLOW, O_NOFOLLOW), never enters another file system (a mount
 * point, an automount), never writes, and reads at most
 * MAX_ENTRIES entries of a directory; a full queue drops the request (read
 * ahead is a hint).  Warm directories never get here: the cost is only paid
 * where the disk is read anyway.  Workers block every signal, as the READ
 * workers (_readpool.c) do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: it sets the feature macros */

#define FUSE_USE_VERSION 35
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "_session.h"

#define WORKERS 2
#define QUEUE 256
/* Entries read ahead for one directory at most, its subdirectories' included
 * (the rest of a huge one is left to the lookups). */
#define MAX_ENTRIES 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;
static int queue[QUEUE];
static unsigned head, queued;
static int started;
static unsigned long long dirs_read, entries_read, dropped;

/* List the directory open as fd (closed here); with entries, lstat each and
 * list each subdirectory too, all within *budget entries.  Returns the
 * entries seen. */
static unsigned long long read_ahead(int fd, int entries, long *budget)
{
    DIR *d = fdopendir(fd);
    if (d == NULL) {
        close(fd);
        return 0;
    }
    unsigned long long n = 0;
    struct stat here;
    if (entries && fstat(dirfd(d), &here) != 0)
        entries = 0;
    struct dirent *e;
    while (*budget > 0 && (e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        if (name[0] == '.' && (name[1] == 0 || (name[1] == '.' && name[2] == 0)))
            continue;
        n++;
        --*budget;
        if (!entries)
            continue;
        struct stat st;
        /* Not into another file system: a mount point (the union's own, or an
         * automount, which AT_NO_AUTOMOUNT leaves untriggered) is not ours to read. */
        if (fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT) != 0 ||
            !S_ISDIR(st.st_mode) || st.st_dev != here.st_dev)
            continue;
        int sub = openat(dirfd(d), name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (sub >= 0)
            n += read_ahead(sub, 0, budget);
    }
    closedir(d);
    return n;
}

static void *worker(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&lock);
    for (;;) {
        while (queued == 0)
            pthread_cond_wait(&work, &lock);
        int fd = queue[head];
        head = (head + 1) % QUEUE;
        queued--;
        pthread_mutex_unlock(&lock);
        long budget = MAX_ENTRIES;
        unsigned long long n = read_ahead(fd, 1, &budget);
        pthread_mutex_lock(&lock);
        dirs_read++;
        entries_read += n;
    }
    return NULL;
}

/* Start the workers (under lock); 0 if none could be started. */
static int start_workers(void)
{
    started = unionfs_start_threads(worker, WORKERS);
    return started;
}

/* read_ahead(dir_fd): queue the directory for a worker; False if dropped. */
static PyObject *read_ahead_dir(PyObject *self, PyObject *arg)
{
    (void)self;
    int dir_fd = PyLong_AsLong(arg);
    if (dir_fd == -1 && PyErr_Occurred())
        return NULL;
    /* Its own descriptor, readable (the daemon's are O_PATH, and may close). */
    int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        Py_RETURN_FALSE; /* not readable by the daemon (a root-owned 0700 one) */
    pthread_mutex_lock(&lock);
    int ok = (started || start_workers()) && queued < QUEUE;
    if (ok) {
        queue[(head + queued) % QUEUE] = fd;
        queued++;
        pthread_cond_signal(&work);
    } else {
        dropped++;
    }
    pthread_mutex_unlock(&lock);
    if (!ok)
        close(fd);
    return PyBool_FromLong(ok);
}

static PyObject *read_ahead_counts(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    pthread_mutex_lock(&lock);
    unsigned long long d = dirs_read, e = entries_read, x = dropped, q = queued;
    pthread_mutex_unlock(&lock);
    return Py_BuildValue("{sKsKsKsK}", "dirs", d, "entries", e, "dropped", x, "queued", q);
}

PyMethodDef unionfs_prefetch_methods[] = {
    {"read_ahead", read_ahead_dir, METH_O,
     "read_ahead(dir_fd): have a worker list the directory, lstat its entries and list its"
     " subdirectories (into the kernel's caches); False if not queued."},
    {"read_ahead_counts", read_ahead_counts, METH_NOARGS,
     "{dirs, entries, dropped, queued}: what the read-ahead workers did so far."},
    {NULL, NULL, 0, NULL},
};
