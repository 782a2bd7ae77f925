/* castlib._accel: the index of a local folder into an SQLite catalog, in C.
 *
 * Optional (setup.py builds it when a compiler and the SQLite headers are there); the
 * Python path of stages/index.py is the reference and the fallback, and decides when
 * this one runs (catalog/accel.py). It does the common case only: list a local tree
 * (one thread: opendir/readdir/fstatat, depth first with an explicit stack, in the order
 * the Python walk of backends/local.py yields) and compare each folder with the catalog
 * rows whose parent is that folder (ix_entries_parent), writing new and changed rows (the
 * calling thread, its own sqlite3 connection, the GIL released). What needs policy goes
 * back to Python: names that look like castlib's temporaries (a callback), unreadable
 * folders and special files (returned in listing order), and the live catalog rows the
 * listing did not see (returned: the vanish guard and the vanished marks stay Python's).
 *
 * Rows are those of catalog.lite.LiteIndexWriter, column for column: ids numbered by the
 * writer from max(id), parents from the folders inserted or matched, paths in the
 * catalog's escaping (catalog/paths.py: a byte that is not UTF-8 as %XX, '%' as %25), and
 * updates as stages/index.py builds them. Batches are committed every `batch` listed
 * entries, as the Python path flushes; the last one stays open until commit(), which the
 * caller runs only once its vanish guard passed.
 *
 * Memory: one folder's listing and catalog rows at a time (plus a bounded queue between
 * the two threads and one bit per catalog id), whatever the size of the tree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#ifdef __linux__
#include <sys/syscall.h>
#endif
#include <time.h>
#include <unistd.h>

/* Python checks it (catalog/accel.py): a stale build of an older source is not used. */
#define ACCEL_VERSION 3

#define TEMP_MARK ".castlib-part-"
#define QUEUE_LIMIT 65536   /* listed entries waiting for the writer */
#define PROGRESS_EVERY 4096
/* The longest the writer holds SQLite's write lock, in ms: every other writer of the
 * catalog (another index, a sync's records, `runs cancel`, this process's heartbeat
 * thread) waits for it, and fails after busy_timeout. */
#define TXN_MAX_MS 1000

/* -- growable byte buffers ----------------------------------------------------------- */
typedef struct {
    char *s;
    size_t n, cap;
} buf_t;

static int buf_reserve(buf_t *b, size_t more) {
    if (b->n + more + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + more + 1) cap *= 2;
    char *s = realloc(b->s, cap);
    if (!s) return -1;
    b->s = s;
    b->cap = cap;
    return 0;
}

static int buf_add(buf_t *b, const char *s, size_t n) {
    if (buf_reserve(b, n)) return -1;
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
    return 0;
}

static void buf_free(buf_t *b) {
    free(b->s);
    b->s = NULL;
    b->n = b->cap = 0;
}

/* The length of the valid UTF-8 sequence at s (n bytes left), 0 if there is none: the
 * sequences Python's strict UTF-8 decoder accepts (no surrogates, overlongs or values
 * above U+10FFFF). Bytes of anything else are what os.fsdecode escapes one by one. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) { len = 3; lo = 0xA0; }
    else if (c >= 0xE1 && c <= 0xEC) len = 3;
    else if (c == 0xED) { len = 3; hi = 0x9F; }
    else if (c >= 0xEE && c <= 0xEF) len = 3;
    else if (c == 0xF0) { len = 4; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) { len = 4; hi = 0x8F; }
    else return 0;
    if (n < len) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

/* raw name bytes -> the catalog's text (catalog/paths.py to_catalog of os.fsdecode) */
static int escape_add(buf_t *out, const char *raw, size_t n) {
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *s = (const unsigned char *)raw;
    size_t i = 0;
    while (i < n) {
        size_t run = i;   /* plain bytes copied in one go */
        while (run < n && s[run] < 0x80 && s[run] != '%') run++;
        if (run > i) {
            if (buf_add(out, raw + i, run - i)) return -1;
            i = run;
            continue;
        }
        if (s[i] == '%') {
            if (buf_add(out, "%25", 3)) return -1;
            i++;
            continue;
        }
        size_t len = utf8_seq(s + i, n - i);
        if (len) {
            if (buf_add(out, raw + i, len)) return -1;
            i += len;
        } else {
            char e[3] = {'%', hex[s[i] >> 4], hex[s[i] & 15]};
            if (buf_add(out, e, 3)) return -1;
            i++;
        }
    }
    return 0;
}

/* -- what the walker hands the writer ------------------------------------------------ */
typedef struct dirnode {
    char *abs;            /* the folder's path as the walk opens it */
    size_t abs_len;
    char *cpath;          /* its catalog path ("" for the root); set by the writer */
    sqlite3_int64 id;     /* its catalog row (0: none); set by the writer */
    int is_root;
    dev_t dev;            /* as the parent's listing saw it (fstatat): the folder opened */
    ino_t ino;            /* by its path must be that one (see walk_one) */
} dirnode;

/* an error record's code for a folder that was replaced between its parent's listing and
 * its own (another folder, or a link in its path): not listed, reported unreadable */
#define ERR_REPLACED (-1)

enum { K_FILE = 'f', K_DIR = 'd', K_LINK = 'l', K_SPECIAL = 's', K_ERROR = 'e' };

typedef struct {
    size_t name;          /* offsets into the listing's pool */
    size_t name_len;
    size_t target;        /* (size_t)-1: none */
    size_t target_len;
    char kind;
    int err;              /* K_ERROR: errno of the stat */
    const char *special;  /* K_SPECIAL: its kind's name */
    long long size, mtime_ns;
    int mode;
    dirnode *child;       /* K_DIR */
} entry_t;

typedef struct listing {
    dirnode *dir;
    entry_t *entries;
    size_t n, cap;
    buf_t pool;
    int open_errno, read_errno;
    struct listing *next;
} listing;

/* -- the whole run --------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    char *db_path;
    char *root;
    size_t root_len;
    long long loc_id;
    char now[40];
    char token[128];      /* the settings row of the location's write token */
    long long batch;
    PyObject *is_temp;    /* name (str) -> bool */
    PyObject *progress;   /* n (int) -> None */
    int ran, in_txn;
    long long txn_began_ms;   /* monotonic clock, when in_txn was set */
    /* statements */
    sqlite3_stmt *s_children, *s_root_children, *s_lookup, *s_insert, *s_update,
                 *s_update_content, *s_maxid, *s_token, *s_scan, *s_has_rows, *s_span;
    /* queue between the threads */
    pthread_mutex_t mu;
    pthread_cond_t cv_items, cv_room;
    listing *head, *tail;
    size_t queued;
    int walk_done, sync_ready;
    int abort;            /* set by the writer, read by the walker unlocked: ABORTED() */
    int running;          /* run() or commit() uses the connection (GIL released) */
    int walk_failed;      /* out of memory in the walker */
    char walk_fail_at[256];   /* the folder it was listing then */
    /* the walker's stack of folders still to list: the Indexer's, freed only after the
     * walker is joined, since queued listings point at these nodes (their entries'
     * `child`) and the writer fills them in */
    dirnode **stack;
    size_t depth, stack_cap;
    /* the writer's state */
    PyThreadState *ts;
    sqlite3_int64 last_id, first_new_id;
    int have_first, wrote;
    long long pending, unreported;
    uint8_t *seen;
    size_t seen_bytes;
    int has_rows;
    long long counts_files, counts_dirs, counts_links, counts_bytes, counts_new,
              counts_changed, counts_unchanged;
    long long known_files;   /* live files the catalog knew that the listing saw */
    PyObject *errors, *specials, *temps, *unseen;   /* lists, filled with the GIL held */
    buf_t errbuf;         /* error list built without the GIL: (rel, errno) records */
    buf_t specbuf;
    buf_t tempbuf;
    char message[512];    /* the first failure */
    int errcode;          /* its SQLite error code (0: none) */
    int failed_py;        /* a Python exception is set (callback) */
} Indexer;

#define ABORTED(x) __atomic_load_n(&(x)->abort, __ATOMIC_ACQUIRE)

static void set_fail(Indexer *x, const char *what) {
    if (!x->message[0]) {
        const char *e = x->db ? sqlite3_errmsg(x->db) : "";
        x->errcode = x->db ? sqlite3_extended_errcode(x->db) : 0;
        snprintf(x->message, sizeof x->message, "%.200s: %.300s", what, e);
    }
}

/* -- the walker thread ------------------------------------------------------------------ */
static dirnode *dirnode_new(const char *abs, size_t len) {
    dirnode *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->abs = malloc(len + 1);
    if (!d->abs) { free(d); return NULL; }
    memcpy(d->abs, abs, len);
    d->abs[len] = 0;
    d->abs_len = len;
    return d;
}

static void dirnode_free(dirnode *d) {
    if (!d) return;
    free(d->abs);
    free(d->cpath);
    free(d);
}

static void listing_free(listing *L, int with_children) {
    if (!L) return;
    if (with_children)   /* folders the writer will never see (an aborted run) */
        for (size_t i = 0; i < L->n; i++)
            if (L->entries[i].kind == K_DIR) dirnode_free(L->entries[i].child);
    free(L->entries);
    buf_free(&L->pool);
    free(L);
}

static entry_t *listing_add(listing *L, const char *name, size_t len) {
    if (L->n == L->cap) {
        size_t cap = L->cap ? L->cap * 2 : 64;
        entry_t *e = realloc(L->entries, cap * sizeof *e);
        if (!e) return NULL;
        L->entries = e;
        L->cap = cap;
    }
    entry_t *e = &L->entries[L->n];
    memset(e, 0, sizeof *e);
    e->name = L->pool.n;
    e->name_len = len;
    e->target = (size_t)-1;
    if (buf_add(&L->pool, name, len) || buf_add(&L->pool, "", 1)) return NULL;
    L->n++;
    return e;
}

static void enqueue(Indexer *x, listing *L) {
    pthread_mutex_lock(&x->mu);
    while (x->queued > QUEUE_LIMIT && !ABORTED(x)) pthread_cond_wait(&x->cv_room, &x->mu);
    if (x->tail) x->tail->next = L;
    else x->head = L;
    x->tail = L;
    x->queued += L->n + 1;
    pthread_cond_signal(&x->cv_items);
    pthread_mutex_unlock(&x->mu);
}

static const char *special_kind(mode_t m) {
    switch (m & S_IFMT) {
    case S_IFIFO: return "fifo";
    case S_IFSOCK: return "socket";
    case S_IFCHR: return "character device";
    case S_IFBLK: return "block device";
    default: return "special";
    }
}

static int walk_one(Indexer *x, dirnode *d, dirnode ***stack, size_t *depth, size_t *cap) {
    listing *L = calloc(1, sizeof *L);
    if (!L) return -1;
    L->dir = d;
    int fd;
    if (d->is_root)   /* the root may be a link to a folder, and is followed */
        fd = open(d->abs, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    else   /* below it a link is an entry, never followed, even one put there mid-walk */
        fd = open(d->abs, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd >= 0 && !d->is_root) {
        /* O_NOFOLLOW covers the last component only: a parent folder swapped for a link
         * mid-walk would have this path lead elsewhere (out of the tree). The folder
         * opened must be the one its parent listed. */
        struct stat st;
        if (fstat(fd, &st) || st.st_dev != d->dev || st.st_ino != d->ino) {
            L->open_errno = ERR_REPLACED;
            close(fd);
            enqueue(x, L);
            return 0;
        }
    }
    DIR *dp = fd < 0 ? NULL : fdopendir(fd);
    if (!dp) {
        L->open_errno = errno;
        if (fd >= 0) close(fd);
        enqueue(x, L);
        return 0;
    }
    size_t nsub = 0, first_sub = *depth;
    int sep = d->abs_len && d->abs[d->abs_len - 1] != '/';
    buf_t path = {0};
    for (;;) {
        if (ABORTED(x)) break;
        errno = 0;
        struct dirent *de = readdir(dp);
        if (!de) {
            if (errno) L->read_errno = errno;
            break;
        }
        const char *name = de->d_name;
        if (name[0] == '.' && (!name[1] || (name[1] == '.' && !name[2]))) continue;
        size_t nlen = strlen(name);
        size_t full = d->abs_len + sep + nlen;
        struct stat st;
        int err = 0;
        /* the Python walk stats the joined path: a path too long for the kernel is an
         * error of that entry there, so here too */
        if (full >= PATH_MAX) err = ENAMETOOLONG;
        else if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW)) err = errno;
        if (err == ENOENT) continue;   /* gone since the folder was read: not there */
        entry_t *e = listing_add(L, name, nlen);
        if (!e) goto oom;
        if (err) {
            e->kind = K_ERROR;
            e->err = err;
            continue;
        }
        e->mode = st.st_mode & 07777;
        e->mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
        switch (st.st_mode & S_IFMT) {
        case S_IFREG:
            e->kind = K_FILE;
            e->size = st.st_size;
            break;
        case S_IFDIR: {
            e->kind = K_DIR;
            e->size = 0;
            path.n = 0;
            if (buf_add(&path, d->abs, d->abs_len) || (sep && buf_add(&path, "/", 1))
                || buf_add(&path, name, nlen))
                goto oom;
            dirnode *c = dirnode_new(path.s, path.n);
            if (!c) goto oom;
            c->dev = st.st_dev;
            c->ino = st.st_ino;
            e->child = c;
            if (*depth == *cap) {
                size_t ncap = *cap ? *cap * 2 : 256;
                dirnode **s = realloc(*stack, ncap * sizeof *s);
                if (!s) goto oom;
                *stack = s;
                *cap = ncap;
            }
            (*stack)[(*depth)++] = c;
            nsub++;
            break;
        }
        case S_IFLNK: {
            e->kind = K_LINK;
            e->size = st.st_size;
            char target[PATH_MAX + 1];
            ssize_t t = readlinkat(fd, name, target, sizeof target);
            if (t >= 0 && (size_t)t < sizeof target) {
                size_t at = L->pool.n;
                if (buf_add(&L->pool, target, (size_t)t) || buf_add(&L->pool, "", 1))
                    goto oom;
                e = &L->entries[L->n - 1];
                e->target = at;
                e->target_len = (size_t)t;
            }
            break;
        }
        default:   /* sockets, fifos, devices: not data; said, not catalogued */
            e->kind = K_SPECIAL;
            e->special = special_kind(st.st_mode);
        }
    }
    closedir(dp);
    buf_free(&path);
    /* the first subfolder is walked next (the Python walk pushes them reversed) */
    for (size_t i = 0; i < nsub / 2; i++) {
        dirnode *t = (*stack)[first_sub + i];
        (*stack)[first_sub + i] = (*stack)[first_sub + nsub - 1 - i];
        (*stack)[first_sub + nsub - 1 - i] = t;
    }
    enqueue(x, L);
    return 0;
oom:
    closedir(dp);
    buf_free(&path);
    *depth = first_sub;   /* the children are freed with the listing */
    listing_free(L, 1);
    return -1;
}

/* Nothing is freed here, on any path: a node on the stack may be the `child` of an entry
 * of a listing still queued (the writer fills in its cpath and id), so the stack is freed
 * by Indexer_run once the walker is joined and the queue drained. */
static void *walker_main(void *arg) {
    Indexer *x = arg;
    dirnode *root = dirnode_new(x->root, x->root_len);
    if (!root) {
        snprintf(x->walk_fail_at, sizeof x->walk_fail_at, "%.200s", x->root);
        goto fail;
    }
    root->is_root = 1;
    x->stack = malloc(256 * sizeof *x->stack);
    if (!x->stack) { dirnode_free(root); goto fail; }
    x->stack_cap = 256;
    x->stack[x->depth++] = root;
    while (x->depth && !ABORTED(x)) {
        dirnode *d = x->stack[--x->depth];
        if (walk_one(x, d, &x->stack, &x->depth, &x->stack_cap)) {
            /* back on the stack (its slot is free): its parent's listing may be queued */
            x->stack[x->depth++] = d;
            snprintf(x->walk_fail_at, sizeof x->walk_fail_at, "%.200s", d->abs);
            goto fail;
        }
    }
    pthread_mutex_lock(&x->mu);
    x->walk_done = 1;
    pthread_cond_signal(&x->cv_items);
    pthread_mutex_unlock(&x->mu);
    return NULL;
fail:
    pthread_mutex_lock(&x->mu);
    x->walk_failed = 1;
    x->walk_done = 1;
    pthread_cond_signal(&x->cv_items);
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

/* the listings queued, dropped (their folders' nodes; the subfolders stay the stack's) */
static void drain_locked(Indexer *x) {
    while (x->head) {
        listing *L = x->head;
        x->head = L->next;
        x->queued -= L->n + 1;
        dirnode_free(L->dir);
        listing_free(L, 0);
    }
    x->tail = NULL;
    pthread_cond_broadcast(&x->cv_room);
}

static int write_commit(Indexer *x);
static int report_progress(Indexer *x);

/* How often the writer waiting for the walker looks for Ctrl-C, SIGTERM or a cancel
 * (the progress callback may raise), as it does every PROGRESS_EVERY entries otherwise */
#define WAIT_CHECK_MS 150

static int check_interrupt(Indexer *x) {
    if (x->unreported) return report_progress(x);   /* it checks the signals too */
    PyEval_RestoreThread(x->ts);
    int r = PyErr_CheckSignals();
    if (r) x->failed_py = 1;
    x->ts = PyEval_SaveThread();
    return r;
}

/* The next listing, NULL at the end of the walk, when it failed (walk_failed), when a
 * commit failed (x->message) or on Ctrl-C (failed_py). `writer`: the writer's own call,
 * which waits WAIT_CHECK_MS at a time, and after each such wait commits its open batch
 * (a slow, cold or network, tree never keeps the write lock while nothing is written)
 * and looks for signals; the last batch, still open when the walk ends, is committed by
 * commit() only, after the caller's vanish guard. */
static listing *dequeue(Indexer *x, int writer) {
    pthread_mutex_lock(&x->mu);
    while (!x->head && !x->walk_done) {
        if (!writer) {
            pthread_cond_wait(&x->cv_items, &x->mu);
            continue;
        }
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);   /* the condition's clock */
        t.tv_nsec += WAIT_CHECK_MS * 1000000L;
        if (t.tv_nsec >= 1000000000L) {
            t.tv_sec++;
            t.tv_nsec -= 1000000000L;
        }
        if (pthread_cond_timedwait(&x->cv_items, &x->mu, &t) == ETIMEDOUT) {
            pthread_mutex_unlock(&x->mu);
            /* the walker is slow (cold, network tree): the batch so far is committed
             * rather than the write lock held while nothing is written. Not before a
             * wait: the writer catching up with a walker about to finish must leave the
             * last batch open, for commit() after the vanish guard. */
            if (x->in_txn) {
                if (write_commit(x)) return NULL;
                x->pending = 0;
            }
            if (check_interrupt(x)) return NULL;   /* run() rolls back, joins the walker */
            pthread_mutex_lock(&x->mu);
        }
    }
    if (x->walk_failed) {   /* the walk is incomplete: nothing more is written */
        drain_locked(x);
        pthread_mutex_unlock(&x->mu);
        return NULL;
    }
    listing *L = x->head;
    if (L) {
        x->head = L->next;
        if (!x->head) x->tail = NULL;
        x->queued -= L->n + 1;
        pthread_cond_signal(&x->cv_room);
    }
    pthread_mutex_unlock(&x->mu);
    return L;
}

/* -- the writer (the calling thread, GIL released) ------------------------------------ */
static int step_done(Indexer *x, sqlite3_stmt *s, int rc, const char *what) {
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) {
        set_fail(x, what);
        return -1;
    }
    return 0;
}

static int exec_sql(Indexer *x, const char *sql) {
    if (sqlite3_exec(x->db, sql, NULL, NULL, NULL) != SQLITE_OK) {
        set_fail(x, sql);
        return -1;
    }
    return 0;
}

/* -1: out of memory, -2: an id no bitmap holds (negative, or too big to index one) */
static int seen_mark(Indexer *x, sqlite3_int64 id) {
    if (id < 0 || (uint64_t)id >> 3 >= SIZE_MAX / 2) return -2;
    size_t byte = (size_t)(id >> 3);
    if (byte >= x->seen_bytes) {
        size_t n = x->seen_bytes ? x->seen_bytes : 4096;
        while (n <= byte) n *= 2;   /* byte < SIZE_MAX / 2: no overflow */
        uint8_t *s = realloc(x->seen, n);
        if (!s) return -1;
        memset(s + x->seen_bytes, 0, n - x->seen_bytes);
        x->seen = s;
        x->seen_bytes = n;
    }
    x->seen[byte] |= (uint8_t)(1u << (id & 7));
    return 0;
}

static int seen_mark_or_fail(Indexer *x, sqlite3_int64 id) {
    int r = seen_mark(x, id);
    if (r == -2 && !x->message[0])
        snprintf(x->message, sizeof x->message, "catalog entry id %lld is out of range "
                 "(negative or too large): the accelerator cannot index this catalog",
                 (long long)id);
    else if (r) set_fail(x, "out of memory");
    return r ? -1 : 0;
}

static int seen_has(Indexer *x, sqlite3_int64 id) {
    if (id < 0) return 0;
    size_t byte = (size_t)(id >> 3);
    return byte < x->seen_bytes && (x->seen[byte] >> (id & 7)) & 1;
}

/* A batch's transaction, begun at its first write (a listing that changes nothing takes
 * no write lock at all) */
static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int write_begin(Indexer *x) {
    if (x->in_txn) return 0;
    if (exec_sql(x, "BEGIN IMMEDIATE")) return -1;
    x->in_txn = 1;
    x->txn_began_ms = now_ms();
    int rc = sqlite3_step(x->s_maxid);
    x->last_id = rc == SQLITE_ROW ? sqlite3_column_int64(x->s_maxid, 0) : 0;
    return step_done(x, x->s_maxid, rc, "max(id)");
}

static int write_commit(Indexer *x) {
    if (!x->in_txn) return 0;
    if (x->wrote) {   /* as catalog.lite._entries_written: a new token, same transaction */
        sqlite3_bind_text(x->s_token, 1, x->token, -1, SQLITE_STATIC);
        if (step_done(x, x->s_token, sqlite3_step(x->s_token), "write token")) return -1;
    }
    if (exec_sql(x, "COMMIT")) return -1;
    x->in_txn = 0;
    x->wrote = 0;
    return 0;
}

typedef struct {
    sqlite3_int64 id;
    char *name, *path, *target;   /* in the rows' pool */
    char kind;
    int size_null, mtime_null, mode_null, deleted, corrupted;
    long long size, mtime_ns;
    int mode;
} oldrow;

typedef struct {
    oldrow *rows;
    size_t n, cap;
    buf_t pool;
    size_t *name_at, *path_at, *target_at;   /* offsets while the pool grows */
} rowset;

static void rowset_clear(rowset *r) {
    r->n = 0;
    r->pool.n = 0;
}

static void rowset_free(rowset *r) {
    free(r->rows);
    free(r->name_at);
    free(r->path_at);
    free(r->target_at);
    buf_free(&r->pool);
    memset(r, 0, sizeof *r);
}

static const char *col_text(sqlite3_stmt *s, int i, size_t *len) {
    const unsigned char *t = sqlite3_column_text(s, i);
    *len = (size_t)sqlite3_column_bytes(s, i);
    return (const char *)t;
}

/* the rows a statement gives (id, name, path, kind, size, mtime_ns, mode, link_target,
 * deleted, corrupted), appended to r */
static int rowset_fill(Indexer *x, rowset *r, sqlite3_stmt *s) {
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        if (r->n == r->cap) {
            size_t cap = r->cap ? r->cap * 2 : 64;
            oldrow *rows = realloc(r->rows, cap * sizeof *rows);
            size_t *a = realloc(r->name_at, cap * sizeof *a);
            if (rows) r->rows = rows;
            if (a) r->name_at = a;
            size_t *b = realloc(r->path_at, cap * sizeof *b);
            if (b) r->path_at = b;
            size_t *c = realloc(r->target_at, cap * sizeof *c);
            if (c) r->target_at = c;
            if (!rows || !a || !b || !c) { set_fail(x, "out of memory"); sqlite3_reset(s); return -1; }
            r->cap = cap;
        }
        oldrow *o = &r->rows[r->n];
        o->id = sqlite3_column_int64(s, 0);
        size_t len;
        const char *t = col_text(s, 1, &len);
        r->name_at[r->n] = r->pool.n;
        if (buf_add(&r->pool, t ? t : "", t ? len : 0) || buf_add(&r->pool, "", 1)) goto oom;
        t = col_text(s, 2, &len);
        r->path_at[r->n] = r->pool.n;
        if (buf_add(&r->pool, t ? t : "", t ? len : 0) || buf_add(&r->pool, "", 1)) goto oom;
        t = col_text(s, 3, &len);
        o->kind = t && len ? t[0] : 0;
        o->size_null = sqlite3_column_type(s, 4) == SQLITE_NULL;
        o->size = sqlite3_column_int64(s, 4);
        o->mtime_null = sqlite3_column_type(s, 5) == SQLITE_NULL;
        o->mtime_ns = sqlite3_column_int64(s, 5);
        o->mode_null = sqlite3_column_type(s, 6) == SQLITE_NULL;
        o->mode = sqlite3_column_int(s, 6);
        if (sqlite3_column_type(s, 7) == SQLITE_NULL) r->target_at[r->n] = (size_t)-1;
        else {
            t = col_text(s, 7, &len);
            r->target_at[r->n] = r->pool.n;
            if (buf_add(&r->pool, t ? t : "", t ? len : 0) || buf_add(&r->pool, "", 1)) goto oom;
        }
        o->deleted = sqlite3_column_int(s, 8) != 0;
        o->corrupted = sqlite3_column_int(s, 9) != 0;
        r->n++;
    }
    return step_done(x, s, rc, "read entries");
oom:
    set_fail(x, "out of memory");
    sqlite3_reset(s);
    return -1;
}

static void rowset_pointers(rowset *r) {
    for (size_t i = 0; i < r->n; i++) {
        r->rows[i].name = r->pool.s + r->name_at[i];
        r->rows[i].path = r->pool.s + r->path_at[i];
        r->rows[i].target = r->target_at[i] == (size_t)-1 ? NULL : r->pool.s + r->target_at[i];
    }
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const oldrow *)a)->name, ((const oldrow *)b)->name);
}

static oldrow *find_child(rowset *r, const char *name, const char *path) {
    size_t lo = 0, hi = r->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(r->rows[mid].name, name);
        if (!c) {   /* a row with a stale parent is not this one */
            return strcmp(r->rows[mid].path, path) ? NULL : &r->rows[mid];
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* errors, specials and temporaries are kept as records until the GIL is held again:
 * (kind byte, errno or special kind's index, rel path length, rel path) */
static int note_rel(buf_t *b, int code, const char *rel, size_t n) {
    int32_t hdr[2] = {code, (int32_t)n};
    if (buf_add(b, (const char *)hdr, sizeof hdr)) return -1;
    return buf_add(b, rel, n);
}

static int bind_text_or_null(sqlite3_stmt *s, int i, const char *t, size_t n) {
    return t ? sqlite3_bind_text(s, i, t, (int)n, SQLITE_STATIC) : sqlite3_bind_null(s, i);
}

static int call_is_temp(Indexer *x, const char *name, size_t n) {
    PyEval_RestoreThread(x->ts);
    int answer = -1;
    PyObject *s = PyUnicode_DecodeFSDefaultAndSize(name, (Py_ssize_t)n);
    if (s) {
        PyObject *r = PyObject_CallOneArg(x->is_temp, s);
        Py_DECREF(s);
        if (r) {
            answer = PyObject_IsTrue(r);
            Py_DECREF(r);
        }
    }
    if (answer < 0) x->failed_py = 1;
    x->ts = PyEval_SaveThread();
    return answer;
}

static int report_progress(Indexer *x) {
    if (!x->unreported) return 0;
    PyEval_RestoreThread(x->ts);
    int ok = 0;
    if (x->progress != Py_None) {
        PyObject *r = PyObject_CallFunction(x->progress, "L", x->unreported);
        if (!r) ok = -1;
        Py_XDECREF(r);
    }
    if (!ok && PyErr_CheckSignals()) ok = -1;   /* Ctrl-C */
    if (ok) x->failed_py = 1;
    x->ts = PyEval_SaveThread();
    x->unreported = 0;
    return ok;
}

static int lookup_path(Indexer *x, rowset *one, const char *path, size_t n) {
    rowset_clear(one);
    sqlite3_bind_int64(x->s_lookup, 1, x->loc_id);
    sqlite3_bind_text(x->s_lookup, 2, path, (int)n, SQLITE_STATIC);
    if (rowset_fill(x, one, x->s_lookup)) return -1;
    rowset_pointers(one);
    return 0;
}

static int same_text(const char *a, const char *b) {
    if (!a || !b) return a == b;
    return !strcmp(a, b);
}

static int write_listing(Indexer *x, listing *L, rowset *kids, rowset *one, buf_t *cpath,
                         buf_t *ctarget, buf_t *rel) {
    dirnode *d = L->dir;
    const char *dcp = d->is_root ? "" : d->cpath;
    size_t dcp_len = strlen(dcp);
    const char *drel = d->abs + x->root_len + (d->is_root ? 0 : (x->root[x->root_len - 1] == '/' ? 0 : 1));
    size_t drel_len = d->is_root ? 0 : strlen(drel);
    if (d->is_root) drel = "";
    if (L->open_errno)
        return note_rel(&x->errbuf, L->open_errno, drel, drel_len);
    rowset_clear(kids);
    if (x->has_rows && (d->is_root || d->id)) {
        sqlite3_stmt *s = d->is_root ? x->s_root_children : x->s_children;
        if (d->is_root) sqlite3_bind_int64(s, 1, x->loc_id);
        else {
            sqlite3_bind_int64(s, 1, d->id);
            sqlite3_bind_int64(s, 2, x->loc_id);
        }
        if (rowset_fill(x, kids, s)) return -1;
        rowset_pointers(kids);
        qsort(kids->rows, kids->n, sizeof *kids->rows, by_name);
    }
    for (size_t i = 0; i < L->n; i++) {
        entry_t *e = &L->entries[i];
        const char *name = L->pool.s + e->name;
        rel->n = 0;
        if (buf_add(rel, drel, drel_len) || (drel_len && buf_add(rel, "/", 1))
            || buf_add(rel, name, e->name_len))
            goto oom;
        if (e->kind == K_ERROR) {
            if (note_rel(&x->errbuf, e->err, rel->s, rel->n)) goto oom;
            continue;
        }
        if (e->kind == K_SPECIAL) {
            if (note_rel(&x->specbuf, 0, e->special, strlen(e->special))
                || note_rel(&x->specbuf, 0, rel->s, rel->n))
                goto oom;
            continue;
        }
        cpath->n = 0;
        if (buf_add(cpath, dcp, dcp_len) || (dcp_len && buf_add(cpath, "/", 1))) goto oom;
        size_t name_at = cpath->n;
        if (escape_add(cpath, name, e->name_len)) goto oom;
        if (memmem(name, e->name_len, TEMP_MARK, sizeof TEMP_MARK - 1)) {
            int t = call_is_temp(x, name, e->name_len);
            if (t < 0) return -1;
            if (t) {   /* castlib's own temporary: left out, reported */
                if (note_rel(&x->tempbuf, 0, rel->s, rel->n)) goto oom;
                if (e->kind == K_DIR) {   /* walked all the same, as the Python walk does */
                    e->child->cpath = strdup(cpath->s);
                    if (!e->child->cpath) goto oom;
                    if (x->has_rows) {
                        if (lookup_path(x, one, cpath->s, cpath->n)) return -1;
                        e->child->id = one->n ? one->rows[0].id : 0;
                    }
                }
                continue;
            }
        }
        const char *target = NULL;
        size_t target_len = 0;
        if (e->kind == K_LINK && e->target != (size_t)-1) {
            ctarget->n = 0;
            if (escape_add(ctarget, L->pool.s + e->target, e->target_len)) goto oom;
            target = ctarget->s ? ctarget->s : "";
            target_len = ctarget->n;
        }
        if (e->kind == K_FILE) {
            x->counts_files++;
            x->counts_bytes += e->size;
        } else if (e->kind == K_DIR) x->counts_dirs++;
        else x->counts_links++;
        oldrow *old = kids->n ? find_child(kids, cpath->s + name_at, cpath->s) : NULL;
        if (!old && x->has_rows) {   /* a row whose parent link is not that folder's */
            if (lookup_path(x, one, cpath->s, cpath->n)) return -1;
            old = one->n ? &one->rows[0] : NULL;
        }
        char kind[2] = {e->kind, 0};
        sqlite3_int64 id;
        if (!old) {
            x->counts_new++;
            if (write_begin(x)) return -1;
            if (!x->have_first) {
                x->first_new_id = x->last_id;
                x->have_first = 1;
            }
            id = ++x->last_id;
            sqlite3_stmt *s = x->s_insert;
            sqlite3_bind_int64(s, 1, id);
            sqlite3_bind_text(s, 2, cpath->s, (int)cpath->n, SQLITE_STATIC);
            if (d->id) sqlite3_bind_int64(s, 3, d->id);
            else sqlite3_bind_null(s, 3);
            sqlite3_bind_text(s, 4, cpath->s + name_at, (int)(cpath->n - name_at), SQLITE_STATIC);
            sqlite3_bind_text(s, 5, kind, 1, SQLITE_STATIC);
            sqlite3_bind_int64(s, 6, e->size);
            sqlite3_bind_int64(s, 7, e->mtime_ns);
            sqlite3_bind_int(s, 8, e->mode);
            bind_text_or_null(s, 9, target, target_len);
            if (step_done(x, s, sqlite3_step(s), "insert entry")) return -1;
            x->wrote = 1;
            if (x->has_rows && seen_mark_or_fail(x, id)) return -1;
        } else {
            id = old->id;
            if (seen_mark_or_fail(x, id)) return -1;
            if (old->kind == K_FILE && !old->deleted) x->known_files++;
            int same_content = old->kind == e->kind && !old->size_null && old->size == e->size
                               && !old->mtime_null && old->mtime_ns == e->mtime_ns;
            if (!same_content || old->deleted || old->mode_null || old->mode != e->mode
                || !same_text(old->target, target)) {
                if (write_begin(x)) return -1;
                sqlite3_stmt *s = same_content ? x->s_update : x->s_update_content;
                sqlite3_bind_text(s, 1, kind, 1, SQLITE_STATIC);
                sqlite3_bind_int64(s, 2, e->size);
                sqlite3_bind_int64(s, 3, e->mtime_ns);
                sqlite3_bind_int(s, 4, e->mode);
                bind_text_or_null(s, 5, target, target_len);
                /* other bytes now: a corrupted mark was about the old ones */
                sqlite3_bind_int(s, 6, old->corrupted && same_content);
                sqlite3_bind_int64(s, 7, id);
                if (step_done(x, s, sqlite3_step(s), "update entry")) return -1;
                x->wrote = 1;
                /* a folder's mtime moves whenever its content does: not news */
                int dir_touched = e->kind == K_DIR && old->kind == K_DIR && !old->deleted;
                if (dir_touched) x->counts_unchanged++;
                else x->counts_changed++;
            } else x->counts_unchanged++;
        }
        if (e->kind == K_DIR) {
            e->child->cpath = strdup(cpath->s);
            if (!e->child->cpath) goto oom;
            e->child->id = id;
        }
        if (++x->unreported >= PROGRESS_EVERY && report_progress(x)) return -1;
        /* a batch is full, or the write lock has been held long enough */
        if (++x->pending >= x->batch
            || (!(x->pending & 255) && x->in_txn && now_ms() - x->txn_began_ms >= TXN_MAX_MS)) {
            if (write_commit(x)) return -1;
            x->pending = 0;
        }
    }
    if (L->read_errno && note_rel(&x->errbuf, L->read_errno, drel, drel_len)) goto oom;
    return 0;
oom:
    set_fail(x, "out of memory");
    return -1;
}

/* The live rows of the location that the listing did not see, as [(path, id, kind)]:
 * the catalog's own order, one row at a time. */
static int collect_unseen(Indexer *x, buf_t *out) {
    sqlite3_bind_int64(x->s_span, 1, x->loc_id);
    int rc = sqlite3_step(x->s_span);
    sqlite3_int64 lo = 0, hi = -1;
    if (rc == SQLITE_ROW && sqlite3_column_type(x->s_span, 0) != SQLITE_NULL) {
        lo = sqlite3_column_int64(x->s_span, 0);
        hi = sqlite3_column_int64(x->s_span, 1);
    }
    if (step_done(x, x->s_span, rc, "read live entries")) return -1;
    sqlite3_stmt *s = x->s_scan;
    sqlite3_bind_int64(s, 1, x->loc_id);
    sqlite3_bind_int64(s, 2, lo);
    sqlite3_bind_int64(s, 3, hi);
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        sqlite3_int64 id = sqlite3_column_int64(s, 0);
        if (seen_has(x, id)) continue;
        size_t len;
        const char *k = col_text(s, 1, &len);
        char kind = k && len ? k[0] : '?';
        if (kind == K_FILE) x->known_files++;
        const char *p = col_text(s, 2, &len);
        int64_t hdr[2] = {id, kind};
        if (buf_add(out, (const char *)hdr, sizeof hdr)
            || note_rel(out, 0, p ? p : "", p ? len : 0)) {
            sqlite3_reset(s);
            set_fail(x, "out of memory");
            return -1;
        }
    }
    return step_done(x, s, rc, "read live entries");
}

/* -- Python glue ---------------------------------------------------------------------- */
static PyObject *Error;   /* _accel.Error: the run did not complete (its open batch rolled back) */

/* Error(message), with the SQLite code as sqlite3's exceptions have it (sqlite_errorcode),
 * so catalog.database.catalog_fault says a full or read-only catalog in one line */
static PyObject *raise_error(Indexer *x) {
    PyObject *exc = PyObject_CallFunction(Error, "s", x->message[0] ? x->message : "index failed");
    if (!exc) return NULL;
    PyObject *code = x->errcode ? PyLong_FromLong(x->errcode) : Py_NewRef(Py_None);
    if (code) {
        PyObject_SetAttrString(exc, "sqlite_errorcode", code);
        Py_DECREF(code);
    }
    PyErr_SetObject(Error, exc);
    Py_DECREF(exc);
    return NULL;
}

static int prepare(Indexer *x, sqlite3_stmt **s, const char *sql) {
    if (sqlite3_prepare_v2(x->db, sql, -1, s, NULL) != SQLITE_OK) {
        set_fail(x, "prepare");
        return -1;
    }
    return 0;
}

static void finalize_all(Indexer *x) {
    sqlite3_stmt **all[] = {&x->s_children, &x->s_root_children, &x->s_lookup, &x->s_insert,
                            &x->s_update, &x->s_update_content, &x->s_maxid, &x->s_token,
                            &x->s_scan, &x->s_has_rows, &x->s_span};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
        sqlite3_finalize(*all[i]);
        *all[i] = NULL;
    }
}

static void close_db(Indexer *x) {
    if (!x->db) return;
    if (x->in_txn) sqlite3_exec(x->db, "ROLLBACK", NULL, NULL, NULL);
    x->in_txn = 0;
    finalize_all(x);
    sqlite3_close(x->db);
    x->db = NULL;
}

static void Indexer_dealloc(Indexer *x) {
    close_db(x);
    free(x->db_path);
    free(x->root);
    free(x->seen);
    buf_free(&x->errbuf);
    buf_free(&x->specbuf);
    buf_free(&x->tempbuf);
    Py_XDECREF(x->is_temp);
    Py_XDECREF(x->progress);
    if (x->sync_ready) {
        pthread_mutex_destroy(&x->mu);
        pthread_cond_destroy(&x->cv_items);
        pthread_cond_destroy(&x->cv_room);
    }
    Py_TYPE(x)->tp_free((PyObject *)x);
}

#define COLS "id, name, path, kind, size, mtime_ns, mode, link_target, deleted, corrupted"

static int Indexer_init(Indexer *x, PyObject *args, PyObject *kw) {
    static char *names[] = {"db_path", "root", "location_id", "now", "batch", "is_temp",
                            "progress", "token_name", NULL};
    const char *db_path, *now, *token;
    PyObject *db_obj, *root_obj, *is_temp, *progress;
    long long loc_id, batch;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&LsLOOs", names,
                                     PyUnicode_FSConverter, &db_obj, PyUnicode_FSConverter, &root_obj, &loc_id, &now, &batch,
                                     &is_temp, &progress, &token))
        return -1;
    if (!x->sync_ready) {   /* first: dealloc destroys them whatever fails below */
        pthread_mutex_init(&x->mu, NULL);
        pthread_cond_init(&x->cv_items, NULL);
        pthread_cond_init(&x->cv_room, NULL);
        x->sync_ready = 1;
    }
    db_path = PyBytes_AS_STRING(db_obj);   /* as sqlite3.connect() encodes it */
    if (x->db || x->root) {
        Py_DECREF(db_obj);
        Py_DECREF(root_obj);
        PyErr_SetString(PyExc_RuntimeError, "Indexer initialised twice");
        return -1;
    }
    x->root_len = (size_t)PyBytes_GET_SIZE(root_obj);
    x->root = malloc(x->root_len + 1);
    x->db_path = strdup(db_path);
    Py_DECREF(db_obj);
    db_path = x->db_path;
    if (!x->root || !x->db_path) {
        Py_DECREF(root_obj);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(x->root, PyBytes_AS_STRING(root_obj), x->root_len + 1);
    Py_DECREF(root_obj);
    if (!x->root_len || strlen(x->root) != x->root_len || strlen(now) >= sizeof x->now
        || strchr(now, '\'') || batch < 1 || strlen(token) >= sizeof x->token) {
        PyErr_SetString(PyExc_ValueError, "bad root, timestamp or batch");
        return -1;
    }
    x->loc_id = loc_id;
    strcpy(x->now, now);
    strcpy(x->token, token);
    x->batch = batch;
    Py_INCREF(is_temp);
    x->is_temp = is_temp;
    Py_INCREF(progress);
    x->progress = progress;
    if (sqlite3_open_v2(db_path, &x->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
        PyErr_Format(Error, "cannot open catalog %s: %s", db_path,
                     x->db ? sqlite3_errmsg(x->db) : "out of memory");
        close_db(x);
        return -1;
    }
    char sql[1024];
    static const char *pragmas[] = {"journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                                    "busy_timeout=60000", "cache_size=-16384",
                                    "temp_store=MEMORY"};   /* as catalog.lite.LiteStore */
    for (size_t i = 0; i < sizeof pragmas / sizeof *pragmas; i++) {
        snprintf(sql, sizeof sql, "PRAGMA %s", pragmas[i]);
        if (exec_sql(x, sql)) goto fail;
    }
    if (prepare(x, &x->s_children, "SELECT " COLS " FROM entries INDEXED BY ix_entries_parent "
                                   "WHERE parent_id = ?1 AND location_id = ?2")
        || prepare(x, &x->s_root_children, "SELECT " COLS " FROM entries INDEXED BY "
                   "ix_entries_parent WHERE parent_id IS NULL AND location_id = ?1")
        || prepare(x, &x->s_lookup, "SELECT " COLS " FROM entries WHERE location_id = ?1 AND "
                   "path = ?2")
        || prepare(x, &x->s_maxid, "SELECT max(id) FROM entries")
        || prepare(x, &x->s_token, "INSERT INTO settings (name, value) VALUES (?1, "
                   "lower(hex(randomblob(16)))) ON CONFLICT (name) DO UPDATE SET value = "
                   "excluded.value")
        /* the location's rows by their ids: the table in id order (with the other
         * locations' rows in that range, skipped) costs a third of a walk of the
         * (location_id, path) index with a table lookup per row */
        || prepare(x, &x->s_span, "SELECT min(id), max(id) FROM entries WHERE location_id = ?1")
        || prepare(x, &x->s_scan, "SELECT id, kind, path FROM entries NOT INDEXED WHERE id "
                   "BETWEEN ?2 AND ?3 AND location_id = ?1 AND deleted = 0")
        || prepare(x, &x->s_has_rows, "SELECT 1 FROM entries WHERE location_id = ?1 LIMIT 1"))
        goto fail;
    /* the run's constants written into the statements, as LiteIndexWriter does */
    snprintf(sql, sizeof sql, "INSERT INTO entries (id, location_id, path, parent_id, name, "
             "kind, size, mtime_ns, mode, link_target, first_seen, last_seen, deleted) VALUES "
             "(?1, %lld, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '%s', '%s', 0)", loc_id, now, now);
    if (prepare(x, &x->s_insert, sql)) goto fail;
    snprintf(sql, sizeof sql, "UPDATE entries SET kind = ?1, size = ?2, mtime_ns = ?3, "
             "mode = ?4, link_target = ?5, deleted = 0, online = NULL, last_seen = '%s', "
             "corrupted = ?6 WHERE id = ?7", now);
    if (prepare(x, &x->s_update, sql)) goto fail;
    snprintf(sql, sizeof sql, "UPDATE entries SET kind = ?1, size = ?2, mtime_ns = ?3, "
             "mode = ?4, link_target = ?5, deleted = 0, online = NULL, last_seen = '%s', "
             "corrupted = ?6, adler32 = NULL, md5 = NULL, sha256 = NULL WHERE id = ?7", now);
    if (prepare(x, &x->s_update_content, sql)) goto fail;
    return 0;
fail:
    raise_error(x);
    close_db(x);
    return -1;
}

static PyObject *records_to_list(buf_t *b, int with_errno, int pairs) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    size_t at = 0;
    while (at < b->n) {
        int32_t hdr[2];
        memcpy(hdr, b->s + at, sizeof hdr);
        at += sizeof hdr;
        PyObject *item;
        PyObject *rel = PyUnicode_DecodeFSDefaultAndSize(b->s + at, hdr[1]);
        at += (size_t)hdr[1];
        if (!rel) goto fail;
        if (pairs) {   /* (kind, rel) records: the kind first */
            int32_t h2[2];
            memcpy(h2, b->s + at, sizeof h2);
            at += sizeof h2;
            PyObject *path = PyUnicode_DecodeFSDefaultAndSize(b->s + at, h2[1]);
            at += (size_t)h2[1];
            if (!path) { Py_DECREF(rel); goto fail; }
            item = PyTuple_Pack(2, path, rel);
            Py_DECREF(path);
        } else if (with_errno) {
            PyObject *msg = hdr[0] == ERR_REPLACED
                ? PyUnicode_FromString("replaced while the index ran (a link or another "
                                       "folder in its path now): not listed")
                : PyUnicode_DecodeLocale(strerror(hdr[0]), "surrogateescape");
            if (!msg) { Py_DECREF(rel); goto fail; }
            item = PyTuple_Pack(2, rel, msg);
            Py_DECREF(msg);
        } else {
            item = rel;
            Py_INCREF(item);
        }
        Py_DECREF(rel);
        if (!item || PyList_Append(out, item)) { Py_XDECREF(item); goto fail; }
        Py_DECREF(item);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *unseen_to_list(buf_t *b) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    size_t at = 0;
    while (at < b->n) {
        int64_t hdr[2];
        int32_t h2[2];
        memcpy(hdr, b->s + at, sizeof hdr);
        at += sizeof hdr;
        memcpy(h2, b->s + at, sizeof h2);
        at += sizeof h2;
        char kind = (char)hdr[1];
        PyObject *item = Py_BuildValue("(s#Ls#)", b->s + at, (Py_ssize_t)h2[1],
                                       (long long)hdr[0], &kind, (Py_ssize_t)1);
        at += (size_t)h2[1];
        if (!item || PyList_Append(out, item)) { Py_XDECREF(item); Py_DECREF(out); return NULL; }
        Py_DECREF(item);
    }
    return out;
}

/* run(): list and write; returns a dict (counts, errors, specials, temps, unseen,
 * first_new_id). The last batch is left uncommitted: commit() or rollback(). */
static PyObject *Indexer_run(Indexer *x, PyObject *unused) {
    if (!x->db) return PyErr_Format(Error, "the indexer is closed");
    if (x->running) return PyErr_Format(Error, "the indexer is running (in another thread)");
    if (x->ran) return PyErr_Format(Error, "an indexer runs once");
    x->ran = 1;
    x->running = 1;   /* the connection is SQLITE_OPEN_NOMUTEX: no close() meanwhile */
    buf_t unseen = {0};
    pthread_t walker;
    int started = 0, ok = -1;
    x->ts = PyEval_SaveThread();
    rowset kids = {0}, one = {0};
    buf_t cpath = {0}, ctarget = {0}, rel = {0};
    sqlite3_bind_int64(x->s_has_rows, 1, x->loc_id);
    int rc = sqlite3_step(x->s_has_rows);
    x->has_rows = rc == SQLITE_ROW;
    if (step_done(x, x->s_has_rows, rc, "read entries")) goto done;
    /* the walker runs with every signal blocked (it inherits the mask): a signal taken
     * there would interrupt its open/fstatat/getdents (EINTR, a folder reported
     * unreadable) and is the calling thread's business (Ctrl-C, SIGTERM) anyway */
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    int create_rc = pthread_create(&walker, NULL, walker_main, x);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    if (create_rc) {
        set_fail(x, "cannot start the walker thread");
        goto done;
    }
    started = 1;
    listing *L;
    while ((L = dequeue(x, 1))) {
        int r = write_listing(x, L, &kids, &one, &cpath, &ctarget, &rel);
        dirnode_free(L->dir);
        listing_free(L, 0);   /* its subfolders are the walker's (stack or listings) */
        if (r) goto done;
    }
    if (x->message[0] || x->failed_py) goto done;   /* a commit in dequeue failed, Ctrl-C */
    if (x->walk_failed) {
        snprintf(x->message, sizeof x->message, "out of memory while listing %.400s",
                 x->walk_fail_at);
        goto done;
    }
    if (report_progress(x)) goto done;
    if (x->has_rows && collect_unseen(x, &unseen)) goto done;
    ok = 0;
done:
    if (started) {
        pthread_mutex_lock(&x->mu);
        __atomic_store_n(&x->abort, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&x->cv_room);
        pthread_mutex_unlock(&x->mu);
        while ((L = dequeue(x, 0))) {   /* drain what the walker still hands over */
            dirnode_free(L->dir);
            listing_free(L, 0);
        }
        pthread_join(walker, NULL);
        pthread_mutex_lock(&x->mu);
        drain_locked(x);
        pthread_mutex_unlock(&x->mu);
    }
    while (x->depth) dirnode_free(x->stack[--x->depth]);   /* an aborted or failed walk */
    free(x->stack);
    x->stack = NULL;
    x->stack_cap = 0;
    rowset_free(&kids);
    rowset_free(&one);
    buf_free(&cpath);
    buf_free(&ctarget);
    buf_free(&rel);
    PyEval_RestoreThread(x->ts);
    x->ts = NULL;
    x->running = 0;
    if (ok) {
        buf_free(&unseen);
        if (x->in_txn) {
            sqlite3_exec(x->db, "ROLLBACK", NULL, NULL, NULL);
            x->in_txn = 0;
        }
        if (x->failed_py && PyErr_Occurred()) return NULL;
        return raise_error(x);
    }
    PyObject *errors = records_to_list(&x->errbuf, 1, 0);
    PyObject *specials = records_to_list(&x->specbuf, 0, 1);
    PyObject *temps = records_to_list(&x->tempbuf, 0, 0);
    PyObject *unseen_list = unseen_to_list(&unseen);
    buf_free(&unseen);
    PyObject *first = x->have_first ? PyLong_FromLongLong(x->first_new_id) : Py_NewRef(Py_None);
    PyObject *out = NULL;
    if (errors && specials && temps && unseen_list && first)
        out = Py_BuildValue("{s:{s:L,s:L,s:L,s:L,s:L,s:L,s:L},s:O,s:O,s:O,s:O,s:O,s:L}",
                            "counts", "files", x->counts_files, "dirs", x->counts_dirs,
                            "links", x->counts_links, "bytes", x->counts_bytes,
                            "new", x->counts_new, "changed", x->counts_changed,
                            "unchanged", x->counts_unchanged,
                            "errors", errors, "specials", specials, "temps", temps,
                            "unseen", unseen_list, "first_new_id", first,
                            "known_files", x->known_files);
    Py_XDECREF(errors);
    Py_XDECREF(specials);
    Py_XDECREF(temps);
    Py_XDECREF(unseen_list);
    Py_XDECREF(first);
    return out;
}

static PyObject *Indexer_commit(Indexer *x, PyObject *unused) {
    if (!x->db) return PyErr_Format(Error, "the indexer is closed");
    if (x->running) return PyErr_Format(Error, "the indexer is running (in another thread)");
    int r;
    x->running = 1;
    Py_BEGIN_ALLOW_THREADS
    r = write_commit(x);
    Py_END_ALLOW_THREADS
    x->running = 0;
    if (r) return raise_error(x);
    Py_RETURN_NONE;
}

static PyObject *Indexer_close(Indexer *x, PyObject *unused) {
    /* another thread's run() or commit() uses the connection, without SQLite's mutex */
    if (x->running) return PyErr_Format(Error, "the indexer is running (in another thread)");
    close_db(x);   /* an uncommitted last batch is rolled back */
    Py_RETURN_NONE;
}

static PyMethodDef Indexer_methods[] = {
    {"run", (PyCFunction)Indexer_run, METH_NOARGS, "list the tree and write the changes"},
    {"commit", (PyCFunction)Indexer_commit, METH_NOARGS, "commit the last batch"},
    {"close", (PyCFunction)Indexer_close, METH_NOARGS,
     "close the connection (an uncommitted batch is rolled back)"},
    {NULL}};

static PyTypeObject IndexerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "castlib._accel.Indexer",
    .tp_basicsize = sizeof(Indexer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "the index of one local folder into an SQLite catalog (see the module)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Indexer_init,
    .tp_dealloc = (destructor)Indexer_dealloc,
    .tp_methods = Indexer_methods,
};

static PyObject *escape(PyObject *self, PyObject *arg) {
    /* bytes -> the catalog's text of them (tests compare it with catalog.paths) */
    if (!PyBytes_Check(arg)) return PyErr_Format(PyExc_TypeError, "bytes expected");
    buf_t b = {0};
    if (escape_add(&b, PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg))) {
        buf_free(&b);
        return PyErr_NoMemory();
    }
    PyObject *out = PyUnicode_DecodeUTF8(b.s ? b.s : "", (Py_ssize_t)b.n, "strict");
    buf_free(&b);
    return out;
}

/* POSIX cksum's CRC (IEEE 802.3 polynomial, most significant bit first, no reflection),
 * the register after `data` from `crc`: what a host's `cksum` computes before it adds the
 * length and complements (checksum.py does those). Eight bytes a step through eight
 * tables (the "slicing-by-8" of Kounavis and Berry), the GIL released for large buffers:
 * ~4x as fast as md5, which the host's md5sum was run for (see backends/sftp.py). */
static uint32_t cksum_table[8][256];

static void cksum_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i << 24;
        for (int k = 0; k < 8; k++) c = (c & 0x80000000u) ? (c << 1) ^ 0x04C11DB7u : c << 1;
        cksum_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int k = 1; k < 8; k++)
            cksum_table[k][i] = (cksum_table[k - 1][i] << 8)
                                ^ cksum_table[0][cksum_table[k - 1][i] >> 24];
}

static uint32_t cksum_run(uint32_t crc, const unsigned char *p, size_t n) {
    for (; n >= 8; p += 8, n -= 8) {
        uint32_t a = crc ^ ((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16
                            | (uint32_t)p[2] << 8 | (uint32_t)p[3]);
        crc = cksum_table[7][a >> 24] ^ cksum_table[6][(a >> 16) & 0xff]
              ^ cksum_table[5][(a >> 8) & 0xff] ^ cksum_table[4][a & 0xff]
              ^ cksum_table[3][p[4]] ^ cksum_table[2][p[5]] ^ cksum_table[1][p[6]]
              ^ cksum_table[0][p[7]];
    }
    while (n--) crc = (crc << 8) ^ cksum_table[0][(crc >> 24) ^ *p++];
    return crc;
}

static PyObject *cksum_update(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned long crc;
    if (!PyArg_ParseTuple(args, "y*k", &data, &crc)) return NULL;
    uint32_t out = (uint32_t)crc;
    if (data.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS
        out = cksum_run(out, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        out = cksum_run(out, data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(out);
}

/* chmod of a name in a folder, never through a link: Linux 6.6's fchmodat2 with
   AT_SYMLINK_NOFOLLOW, one system call (a link there: EOPNOTSUPP). Before 6.6, or where
   a sandbox filters the call, ENOSYS: the caller goes another way (local.py). */
#if defined(__linux__) && !defined(SYS_fchmodat2)
#define SYS_fchmodat2 452   /* the same number on every Linux architecture */
#endif

/* A system call's outcome for Python: None, or the OSError of errno (done != 0). */
static PyObject *none_or_errno(long done) {
    if (done != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *chmod_nofollow(PyObject *self, PyObject *args) {
    int dirfd;
    const char *name;
    unsigned int mode;
    if (!PyArg_ParseTuple(args, "iyI", &dirfd, &name, &mode)) return NULL;
#ifdef __linux__
    long done;
    Py_BEGIN_ALLOW_THREADS
    done = syscall(SYS_fchmodat2, dirfd, name, (mode_t)mode, AT_SYMLINK_NOFOLLOW);
    Py_END_ALLOW_THREADS
    return none_or_errno(done);
#else
    return none_or_errno((errno = ENOSYS, -1));
#endif
}

/* chown of what an O_PATH descriptor holds (a file, a folder or a link itself): the
   entry looked at, whatever its name leads to now (castlib/backends/local.py, chown) */
static PyObject *chown_fd(PyObject *self, PyObject *args) {
    /* long long: uid_t is unsigned, ids from 2**31 on are owners too; -1 is "unchanged",
       (uid_t)-1, as for os.chown */
    int fd;
    long long uid, gid;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &uid, &gid)) return NULL;
    if (uid < -1 || gid < -1 || uid > (uid_t)-1 || gid > (gid_t)-1) {   /* not made 0 */
        PyErr_SetString(PyExc_OverflowError, "uid or gid out of range");
        return NULL;
    }
#ifdef AT_EMPTY_PATH
    int done;
    Py_BEGIN_ALLOW_THREADS
    done = fchownat(fd, "", (uid_t)uid, (gid_t)gid, AT_EMPTY_PATH);
    Py_END_ALLOW_THREADS
    return none_or_errno(done);
#else
    return none_or_errno((errno = ENOSYS, -1));
#endif
}

static PyMethodDef module_methods[] = {
    {"escape", escape, METH_O, "raw name bytes -> catalog text"},
    {"cksum_update", cksum_update, METH_VARARGS,
     "cksum_update(buffer, crc) -> the POSIX cksum CRC register after buffer"},
    {"chmod_nofollow", chmod_nofollow, METH_VARARGS,
     "chmod_nofollow(dirfd, name, mode): chmod of name in dirfd, not of a link's target"},
    {"chown_fd", chown_fd, METH_VARARGS,
     "chown_fd(fd, uid, gid): chown of what an O_PATH descriptor holds (-1: unchanged)"},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "castlib._accel",
    "Optional C accelerator of the index of local folders into SQLite (see _accel.c)", -1,
    module_methods};

PyMODINIT_FUNC PyInit__accel(void) {
    if (PyType_Ready(&IndexerType) < 0) return NULL;
    cksum_tables();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Error = PyErr_NewException("castlib._accel.Error", PyExc_RuntimeError, NULL);
    if (!Error || PyModule_AddObjectRef(m, "Error", Error) < 0
        || PyModule_AddIntConstant(m, "VERSION", ACCEL_VERSION) < 0
        || PyModule_AddStringConstant(m, "SQLITE_VERSION", sqlite3_libversion()) < 0
        || PyModule_AddObjectRef(m, "Indexer", (PyObject *)&IndexerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
