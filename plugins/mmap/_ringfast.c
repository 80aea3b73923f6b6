/*
 * Compiled fast path of kservice.plugins.mmap.ring: ShmQueue.put and ShmQueue._pop.
 *
 * This file implements the same shared-memory protocol, on the same layout, as
 * the pure-Python code in ring.py (which stays the reference and the fallback;
 * read its module docstring first).  A process using this module and one using
 * the Python code interoperate on one queue.  Every constant below mirrors a
 * ring.py constant; ring.py compares them with LAYOUT before using the module,
 * so a stale build is ignored rather than misread.
 *
 * Only the hot operations live here: put and pop, which never block; the consumer's
 * spin; and its sleep (announce, then doze on the futex), whose fast case only.  Whenever something is
 * unusual (lock busy, ring full, queue closed, a frame that does not check) the
 * functions return a status *without having changed anything*, and the Python
 * code redoes the whole operation on its own path, which raises, waits or
 * recovers exactly as before.  The GIL is held throughout put and pop: the work
 * is a few hundred nanoseconds and never waits.  spin() is the consumer's spin
 * phase: it releases the GIL and watches the tail word with PAUSE, so a record
 * is seen within tens of nanoseconds and the process's other threads run
 * meanwhile; release() waits for spinners to leave before letting go of the
 * mapping.
 *
 * Memory ordering follows ring.py (x86-64 TSO).  Every shared word is accessed
 * with __atomic builtins, so the compiler neither tears nor reorders them:
 * the tail store that publishes a record is a release store issued after the
 * payload copy; the consumer's tail load is an acquire load issued before it
 * copies payload bytes; the consumer's head store is a release store issued
 * after the copy.  On x86-64 these compile to plain aligned movs, exactly the
 * instructions the memoryview accesses of ring.py execute.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if !defined(__linux__) || !defined(__x86_64__)
#error "the kservice shared-memory ring supports Linux on x86-64 only"
#endif

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Layout: see the ring.py module docstring ("Layout"). */
#define LAYOUT_VERSION 1
#define HEADER_SIZE 4096
#define FRAME 8
#define CHECK_KEY 0x5A5AA5A5u
#define OFF_CLOSED 64
#define OFF_RECOVERIES 68
#define OFF_TAIL 128
#define OFF_DATA_SEQ 144
#define OFF_ASLEEP 148
#define OFF_HEAD 192
#define OFF_SPACE_SEQ 208
#define OFF_SPACE_WAITERS 212
#define OFF_MUTEX 256

/* put() results.  PUT_OK: the record is published.  Every other value: nothing
 * was written and no lock is held; the caller runs the pure-Python path. */
enum {
    PUT_OK = 0,
    PUT_BUSY = 1,        /* the producers' lock is held (or trylock failed otherwise) */
    PUT_FULL = 2,        /* not enough free space */
    PUT_CLOSED = 3,      /* the queue is marked closed */
    PUT_TOO_LARGE = 4,   /* the record exceeds the ring's maximum record */
    PUT_NOT_BUFFER = 5,  /* the item exports no C-contiguous buffer */
};

/* pop() statuses (second item of the returned pair). */
enum {
    POP_OK = 0,          /* records removed */
    POP_WAKE = 1,        /* records removed; producers wait for space: call _wake_producers */
    POP_EMPTY = 2,       /* nothing committed */
    POP_CORRUPT = 3,     /* nothing removed: counters or the next frame do not check */
};

typedef struct {
    PyObject_HEAD
    Py_buffer mapping;   /* the whole queue file; held (pinned) until release() */
    char *base;          /* NULL once released */
    uint64_t capacity;
    int fence;           /* fence between the head store and the space_waiters load */
    int spinners;        /* threads inside spin() (the GIL released): release() waits for them */
    int releasing;       /* set by release(): spinners leave at once */
} RingObject;

#define U32(self, off) ((uint32_t *)((self)->base + (off)))
#define U64(self, off) ((uint64_t *)((self)->base + (off)))
#define MUTEX(self) ((pthread_mutex_t *)((self)->base + OFF_MUTEX))

static PyObject *empty_result;    /* (None, POP_EMPTY) */
static PyObject *corrupt_result;  /* (None, POP_CORRUPT) */

static inline uint32_t load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static int
Ring_init(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mapping", "capacity", "fence", NULL};
    PyObject *mapping;
    unsigned long long capacity;
    int fence;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKp", kwlist, &mapping, &capacity, &fence))
        return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ring is already initialised");
        return -1;
    }
    if (capacity < FRAME || capacity % FRAME) {
        PyErr_Format(PyExc_ValueError, "capacity %llu is not a positive multiple of %d", capacity, FRAME);
        return -1;
    }
    if (PyObject_GetBuffer(mapping, &self->mapping, PyBUF_WRITABLE) < 0)
        return -1;
    if ((uint64_t)self->mapping.len != HEADER_SIZE + (uint64_t)capacity || ((uintptr_t)self->mapping.buf % 64)) {
        PyErr_Format(PyExc_ValueError, "mapping of %zd bytes does not hold a ring of capacity %llu",
                     self->mapping.len, capacity);
        PyBuffer_Release(&self->mapping);
        return -1;
    }
    self->base = self->mapping.buf;
    self->capacity = capacity;
    self->fence = fence;
    return 0;
}

static void
Ring_dealloc(RingObject *self)
{
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->mapping);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Ring_release(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->base != NULL) {
        /* A thread in spin() reads the mapping without the GIL: make it leave, and wait
         * until it has (it leaves within one loop turn, before it takes the GIL back). */
        __atomic_store_n(&self->releasing, 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&self->spinners, __ATOMIC_SEQ_CST) != 0)
            __builtin_ia32_pause();
        self->base = NULL;
        PyBuffer_Release(&self->mapping);
    }
    Py_RETURN_NONE;
}

static int
check_live(RingObject *self)
{
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "the ring's mapping was released");
        return -1;
    }
    return 0;
}

static inline int64_t
monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000LL + now.tv_nsec;
}

/* spin() results: a bit set. */
enum {
    SPIN_ARRIVED = 1,    /* tail moved off head */
    SPIN_LOST_CPU = 2,   /* the spinner was off the CPU for LOST_CPU_NS or more: others want the CPUs */
};

/* Between two looks at the clock a spinner normally runs tens of microseconds at most
 * (yield_every PAUSEs and a sched_yield() that finds nobody to run).  A gap this long means
 * the scheduler ran another thread in its place: typically a sched_yield() that handed the
 * CPU to a busy process for its whole time slice (milliseconds).  Mirrors ring.LOST_CPU. */
#define LOST_CPU_NS 250000

static PyObject *
Ring_spin(RingObject *self, PyObject *args)
{
    unsigned long long head;
    double seconds;
    unsigned int yield_every;
    if (!PyArg_ParseTuple(args, "KdI", &head, &seconds, &yield_every))
        return NULL;
    if (check_live(self) < 0)
        return NULL;
    const uint64_t *tail = U64(self, OFF_TAIL);
    if (__atomic_load_n(tail, __ATOMIC_ACQUIRE) != head)
        return PyLong_FromLong(SPIN_ARRIVED);
    if (yield_every == 0)
        yield_every = 1;
    int result = 0;
    __atomic_add_fetch(&self->spinners, 1, __ATOMIC_SEQ_CST);
    Py_BEGIN_ALLOW_THREADS
    int64_t last = monotonic_ns();
    const int64_t end = last + (int64_t)(seconds * 1e9);
    for (unsigned int turn = 1;; turn++) {
        if (__atomic_load_n(tail, __ATOMIC_ACQUIRE) != head) {
            result |= SPIN_ARRIVED;
            break;
        }
        if (__atomic_load_n(&self->releasing, __ATOMIC_RELAXED))
            break;
        __builtin_ia32_pause();
        if (turn % yield_every == 0) {
            /* Preempted since the last look, or handed over by the yield: spinning on is what loses the CPU. */
            const int64_t now = monotonic_ns();
            int lost = now - last >= LOST_CPU_NS;
            if (!lost) {
                if (now >= end)
                    break;
                sched_yield();  /* hand the core over when processes outnumber cores */
                last = monotonic_ns();
                lost = last - now >= LOST_CPU_NS;
            }
            if (lost) {
                result |= SPIN_LOST_CPU;
                if (__atomic_load_n(tail, __ATOMIC_ACQUIRE) != head)
                    result |= SPIN_ARRIVED;
                break;
            }
        }
    }
    __atomic_sub_fetch(&self->spinners, 1, __ATOMIC_SEQ_CST);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

/* Set the OSError _futex raises for a failed futex call (``what``: "wake", "wait"), errno ``err``. */
static void
set_futex_error(const char *what, int err)
{
    char message[160];
    snprintf(message, sizeof message, "futex %s failed: %s", what, strerror(err));
    PyObject *args = Py_BuildValue("(is)", err, message);
    if (args != NULL) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
}

static int
futex_wake_all(uint32_t *word)
{
    /* A shared futex (no FUTEX_PRIVATE_FLAG), as _futex.futex_wake; the same OSError on failure. */
    if (syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0) < 0) {
        set_futex_error("wake", errno);
        return -1;
    }
    return 0;
}

/* Take the producers' lock without waiting: 0 when held (a dead holder's lock taken over), else the
 * pthread error (EBUSY, ENOTRECOVERABLE), for the Python path to wait or report. */
static int
try_lock(RingObject *self)
{
    pthread_mutex_t *mutex = MUTEX(self);
    const int rc = pthread_mutex_trylock(mutex);
    if (rc == EOWNERDEAD) {
        /* As ShmQueue._lock_slow: the dead holder left the ring consistent
         * (nothing it did is visible before its tail store); take the lock over. */
        pthread_mutex_consistent(mutex);
        uint32_t *recoveries = U32(self, OFF_RECOVERIES);
        store32(recoveries, load32(recoveries) + 1);
        return 0;
    }
    return rc;
}

/* Under nothing: take the producers' lock, append the record, publish it, unlock.
 * Returns PUT_OK, or the reason nothing was written (the lock is not held then).
 * *wake is set when the consumer sleeps and must be woken after the unlock. */
static int
publish(RingObject *self, const char *src, uint64_t n, int *wake)
{
    const uint64_t cap = self->capacity;
    if (n > cap - FRAME)
        return PUT_TOO_LARGE;
    const uint64_t need = FRAME + ((n + 7) & ~(uint64_t)7);
    pthread_mutex_t *mutex = MUTEX(self);
    if (try_lock(self) != 0)
        return PUT_BUSY; /* EBUSY, or ENOTRECOVERABLE for the Python path to report */
    int status = PUT_OK;
    uint64_t *tail_word = U64(self, OFF_TAIL);
    const uint64_t tail = __atomic_load_n(tail_word, __ATOMIC_RELAXED);
    const uint64_t head = __atomic_load_n(U64(self, OFF_HEAD), __ATOMIC_ACQUIRE);
    if (load32(U32(self, OFF_CLOSED))) {
        status = PUT_CLOSED;
    }
    /* ring.py tests cap - (tail - head) < need on unbounded integers: a head
     * beyond the tail (garbage counters) means room there, too. */
    else if (tail >= head && (tail - head > cap || cap - (tail - head) < need)) {
        status = PUT_FULL;
    }
    else {
        char *data = self->base + HEADER_SIZE;
        const uint64_t pos = tail % cap;
        const uint64_t check = (uint32_t)(n ^ CHECK_KEY ^ (tail >> 3));
        __atomic_store_n((uint64_t *)(data + pos), n | check << 32, __ATOMIC_RELAXED);
        uint64_t p = pos + FRAME;
        if (p >= cap)
            p -= cap;
        if (p + n <= cap) {
            memcpy(data + p, src, n);
        }
        else {
            const uint64_t first = cap - p;
            memcpy(data + p, src, first);
            memcpy(data, src + first, n - first);
        }
        __atomic_store_n(tail_word, tail + need, __ATOMIC_RELEASE); /* publish */
        uint32_t *asleep = U32(self, OFF_ASLEEP);
        if (load32(asleep)) {
            uint32_t *data_seq = U32(self, OFF_DATA_SEQ);
            store32(asleep, 0);
            store32(data_seq, load32(data_seq) + 1);
            *wake = 1;
        }
    }
    pthread_mutex_unlock(mutex);
    return status;
}

/* announce() results below zero (zero and above: the data_seq value to wait on). */
enum {
    ANNOUNCE_ARRIVED = -1,   /* a record arrived meanwhile: pop it, do not sleep */
    ANNOUNCE_DECLINED = -2,  /* nothing changed: the Python path announces (lock busy, queue closed, space waiters) */
};

/* Ring.announce() -> int: the consumer's step before it sleeps, as ShmQueue._announce_sleep:
 * under the producers' lock, with the ring empty, read data_seq and set consumer_asleep. */
static PyObject *
Ring_announce(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_live(self) < 0)
        return NULL;
    pthread_mutex_t *mutex = MUTEX(self);
    if (try_lock(self) != 0)
        return PyLong_FromLong(ANNOUNCE_DECLINED);
    long result;
    if (__atomic_load_n(U64(self, OFF_TAIL), __ATOMIC_ACQUIRE) != __atomic_load_n(U64(self, OFF_HEAD), __ATOMIC_RELAXED)) {
        result = ANNOUNCE_ARRIVED;
    }
    else if (load32(U32(self, OFF_CLOSED)) || load32(U32(self, OFF_SPACE_WAITERS))) {
        result = ANNOUNCE_DECLINED;
    }
    else {
        result = (long)load32(U32(self, OFF_DATA_SEQ));
        store32(U32(self, OFF_ASLEEP), 1);
    }
    pthread_mutex_unlock(mutex);
    return PyLong_FromLong(result);
}

/* FUTEX_WAIT on a shared word (no FUTEX_PRIVATE_FLAG, as _futex.futex_wait) for at most ``seconds``,
 * without the GIL: 0 when woken, else the errno (EAGAIN, ETIMEDOUT, EINTR, or a real error). */
static int
futex_wait_unlocked(void *word, uint32_t expected, double seconds)
{
    if (seconds < 0)
        seconds = 0;
    struct timespec timeout;
    timeout.tv_sec = (time_t)seconds;
    timeout.tv_nsec = (long)((seconds - (double)timeout.tv_sec) * 1e9);
    long r;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    r = syscall(SYS_futex, word, FUTEX_WAIT, expected, &timeout, NULL, 0);
    if (r != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return err;
}

/* Ring.doze(seq, seconds) -> int: as _futex.futex_wait on data_seq, without the GIL. */
static PyObject *
Ring_doze(RingObject *self, PyObject *args)
{
    unsigned long seq;
    double seconds;
    if (!PyArg_ParseTuple(args, "kd", &seq, &seconds))
        return NULL;
    if (self->base == NULL)
        return PyLong_FromLong(0); /* closed by another thread: the caller re-checks and raises QueueClosed */
    int err = futex_wait_unlocked(U32(self, OFF_DATA_SEQ), (uint32_t)seq, seconds);
    if (err == 0)
        return PyLong_FromLong(0);
    if (err == EAGAIN || err == ETIMEDOUT || err == EINTR)
        return PyLong_FromLong(err);
    if (err == EFAULT && self->base == NULL)
        return PyLong_FromLong(0); /* unmapped while we went to sleep: as above */
    set_futex_error("wait", err);
    return NULL;
}

/* Ring.put(item) -> int: see ShmQueue.put. */
static PyObject *
Ring_put(RingObject *self, PyObject *item)
{
    if (check_live(self) < 0)
        return NULL;
    int wake = 0;
    int status;
    if (PyBytes_CheckExact(item)) {
        status = publish(self, PyBytes_AS_STRING(item), (uint64_t)PyBytes_GET_SIZE(item), &wake);
    }
    else {
        /* PyBUF_SIMPLE accepts exactly the C-contiguous buffers that ring.py's
         * memoryview(item).cast("B") accepts; anything else takes the Python
         * path and gets its TypeError there. */
        Py_buffer view;
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            return PyLong_FromLong(PUT_NOT_BUFFER);
        }
        status = publish(self, view.buf, (uint64_t)view.len, &wake);
        PyBuffer_Release(&view); /* after the unlock: releasing may run Python code */
    }
    if (wake && futex_wake_all(U32(self, OFF_DATA_SEQ)) < 0)
        return NULL; /* the record is published, as in ring.py */
    return PyLong_FromLong(status);
}

static PyObject *
copy_record(const char *data, uint64_t cap, uint64_t p, uint64_t n)
{
    if (p + n <= cap)
        return PyBytes_FromStringAndSize(data + p, (Py_ssize_t)n);
    PyObject *rec = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (rec != NULL) {
        const uint64_t first = cap - p;
        memcpy(PyBytes_AS_STRING(rec), data + p, first);
        memcpy(PyBytes_AS_STRING(rec) + first, data, n - first);
    }
    return rec;
}

/* Ring.pop(max_items) -> (records, status): see ShmQueue._pop.
 *
 * records is one bytes object for max_items == 0, else a list of at most
 * max_items; None with POP_EMPTY and POP_CORRUPT.  A bad frame after good ones
 * ends the batch (the good records are delivered, the next call reports it). */
static PyObject *
Ring_pop(RingObject *self, PyObject *arg)
{
    if (check_live(self) < 0)
        return NULL;
    const Py_ssize_t max_items = PyLong_AsSsize_t(arg);
    if (max_items == -1 && PyErr_Occurred())
        return NULL;
    uint64_t *head_word = U64(self, OFF_HEAD);
    uint64_t head = __atomic_load_n(head_word, __ATOMIC_RELAXED);
    const uint64_t tail = __atomic_load_n(U64(self, OFF_TAIL), __ATOMIC_ACQUIRE);
    if (head == tail) {
        Py_INCREF(empty_result);
        return empty_result;
    }
    const uint64_t cap = self->capacity;
    if (tail < head || tail - head > cap || (tail - head) % FRAME) {
        Py_INCREF(corrupt_result);
        return corrupt_result;
    }
    /* Allocated before anything is consumed, so that a MemoryError loses no record. */
    PyObject *result = PyTuple_New(2);
    if (result == NULL)
        return NULL;
    PyObject *out = NULL;
    if (max_items != 0 && (out = PyList_New(0)) == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    const char *data = self->base + HEADER_SIZE;
    PyObject *rec = NULL;
    Py_ssize_t got = 0;
    for (;;) {
        const uint64_t pos = head % cap;
        const uint64_t word = __atomic_load_n((const uint64_t *)(data + pos), __ATOMIC_RELAXED);
        const uint64_t n = word & 0xFFFFFFFFu;
        const uint64_t size = FRAME + ((n + 7) & ~(uint64_t)7);
        if ((word >> 32) != (uint32_t)(n ^ CHECK_KEY ^ (head >> 3)) || size > tail - head) {
            if (got)
                break; /* deliver the good records first; the next call reports */
            Py_XDECREF(out);
            Py_DECREF(result);
            Py_INCREF(corrupt_result);
            return corrupt_result;
        }
        uint64_t p = pos + FRAME;
        if (p >= cap)
            p -= cap;
        rec = copy_record(data, cap, p, n);
        if (rec == NULL)
            goto fail; /* head not stored: nothing was consumed */
        head += size;
        got++;
        if (out == NULL)
            break;
        const int appended = PyList_Append(out, rec);
        Py_DECREF(rec);
        if (appended < 0)
            goto fail;
        if (got >= max_items || head == tail)
            break;
    }
    __atomic_store_n(head_word, head, __ATOMIC_RELEASE); /* release the space */
    if (self->fence)
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* store head before loading space_waiters */
    const long status = load32(U32(self, OFF_SPACE_WAITERS)) ? POP_WAKE : POP_OK;
    PyTuple_SET_ITEM(result, 0, out != NULL ? out : rec);
    PyTuple_SET_ITEM(result, 1, PyLong_FromLong(status)); /* a cached small int: cannot fail */
    return result;
fail:
    Py_XDECREF(out);
    Py_DECREF(result);
    return NULL;
}

static PyMethodDef Ring_methods[] = {
    {"put", (PyCFunction)Ring_put, METH_O,
     "put(item) -> int: publish one record (0), or change nothing and return why not (non-zero)."},
    {"pop", (PyCFunction)Ring_pop, METH_O,
     "pop(max_items) -> (records, status): remove up to max_items records (0: one, unwrapped)."},
    {"spin", (PyCFunction)Ring_spin, METH_VARARGS,
     "spin(head, seconds, yield_every) -> int: wait, without the GIL, until tail moves off head "
     "(bit 1 set), seconds pass, or the spinner loses the CPU for 250 us or more (bit 2 set: it stops "
     "at once); sched_yield() every yield_every turns."},
    {"announce", (PyCFunction)Ring_announce, METH_NOARGS,
     "announce() -> int: before sleeping, under the producers' lock: data_seq to wait on, with the "
     "asleep flag set (>= 0); -1: a record arrived; -2: nothing changed, use the Python path."},
    {"doze", (PyCFunction)Ring_doze, METH_VARARGS,
     "doze(seq, seconds) -> int: FUTEX_WAIT on data_seq while it equals seq, without the GIL: 0 "
     "(woken), EAGAIN, ETIMEDOUT or EINTR; OSError otherwise."},
    {"release", (PyCFunction)Ring_release, METH_NOARGS,
     "release(): let go of the mapping (idempotent); later calls raise ValueError."},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------------------------------------
 * The native primitives of _futex.py, as module functions: the same system calls and glibc functions
 * _futex_ctypes.py reaches through ctypes, with the same arguments, results and errors, so a process
 * that has this extension never imports ctypes (about a millisecond of every cold start). Calls that
 * can block (futex_wait, mutex_clocklock, membarrier) release the GIL, as ctypes' CDLL does; the
 * others keep it, as its PyDLL does for the ring's hot path. Addresses are Python ints.
 */

/* A private word for full_barrier(): "locked" from the start, so every pthread_spin_trylock on it is
 * a failed but still locked (hence fencing) cmpxchg, as _futex_ctypes.FENCE_ARG's word. */
static int fence_word = 1;

static int
address_arg(PyObject *arg, void **address)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(arg);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *address = (void *)(uintptr_t)value;
    return 0;
}

/* buffer_address(buffer) -> int: where a writable buffer (an mmap) starts in this process. */
static PyObject *
native_buffer_address(PyObject *Py_UNUSED(module), PyObject *buffer)
{
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    uintptr_t address = (uintptr_t)view.buf;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong((unsigned long long)address);
}

/* futex_wait(address, expected, seconds) -> 0, EAGAIN, ETIMEDOUT or EINTR; OSError otherwise. */
static PyObject *
native_futex_wait(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *where;
    unsigned long long expected;
    double seconds;
    void *address;
    if (!PyArg_ParseTuple(args, "OKd", &where, &expected, &seconds) || address_arg(where, &address) < 0)
        return NULL;
    int err = futex_wait_unlocked(address, (uint32_t)expected, seconds);
    if (err == 0)
        return PyLong_FromLong(0);
    if (err == EAGAIN || err == ETIMEDOUT || err == EINTR)
        return PyLong_FromLong(err);
    set_futex_error("wait", err);
    return NULL;
}

/* futex_wake(address, count=INT_MAX) -> how many woke; OSError on failure. */
static PyObject *
native_futex_wake(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *where;
    int count = INT_MAX;
    void *address;
    if (!PyArg_ParseTuple(args, "O|i", &where, &count) || address_arg(where, &address) < 0)
        return NULL;
    long r = syscall(SYS_futex, address, FUTEX_WAKE, count, NULL, NULL, 0);
    if (r < 0) {
        set_futex_error("wake", errno);
        return NULL;
    }
    return PyLong_FromLong(r);
}

/* mutex_init(address): a process-shared robust mutex at address (fresh, zeroed memory); OSError. */
static PyObject *
native_mutex_init(PyObject *Py_UNUSED(module), PyObject *where)
{
    void *address;
    if (address_arg(where, &address) < 0)
        return NULL;
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init((pthread_mutex_t *)address, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        char message[160];
        snprintf(message, sizeof message, "cannot initialise the queue's robust mutex: %s", strerror(rc));
        PyObject *error = Py_BuildValue("(is)", rc, message);
        if (error != NULL) {
            PyErr_SetObject(PyExc_OSError, error);
            Py_DECREF(error);
        }
        return NULL;
    }
    Py_RETURN_NONE;
}

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
#define HAVE_CLOCKLOCK 1
/* mutex_clocklock(address, deadline) -> 0 or the pthread error: lock, waiting at most until deadline
 * (time.monotonic() seconds), without the GIL. */
static PyObject *
native_mutex_clocklock(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *where;
    double deadline;
    void *address;
    if (!PyArg_ParseTuple(args, "Od", &where, &deadline) || address_arg(where, &address) < 0)
        return NULL;
    if (deadline < 0)
        deadline = 0;
    struct timespec end;
    end.tv_sec = (time_t)deadline;
    end.tv_nsec = (long)((deadline - (double)end.tv_sec) * 1e9);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pthread_mutex_clocklock((pthread_mutex_t *)address, CLOCK_MONOTONIC, &end);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}
#endif

#define NATIVE_LOCK_FUNCTION(name, call)                                  \
    static PyObject *name(PyObject *Py_UNUSED(module), PyObject *where)   \
    {                                                                     \
        void *address;                                                    \
        if (address_arg(where, &address) < 0)                             \
            return NULL;                                                  \
        return PyLong_FromLong(call);                                     \
    }

/* mutex_trylock/mutex_unlock/mutex_consistent(address), spin_trylock(address) -> 0 or the pthread error. */
NATIVE_LOCK_FUNCTION(native_mutex_trylock, pthread_mutex_trylock((pthread_mutex_t *)address))
NATIVE_LOCK_FUNCTION(native_mutex_unlock, pthread_mutex_unlock((pthread_mutex_t *)address))
NATIVE_LOCK_FUNCTION(native_mutex_consistent, pthread_mutex_consistent((pthread_mutex_t *)address))
NATIVE_LOCK_FUNCTION(native_spin_trylock, pthread_spin_trylock((pthread_spinlock_t *)address))

#ifndef SYS_membarrier
#define SYS_membarrier 324 /* x86-64 */
#endif

/* membarrier(command) -> the system call's result (-1 on failure), without the GIL. */
static PyObject *
native_membarrier(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int command = (int)PyLong_AsLong(arg);
    if (command == -1 && PyErr_Occurred())
        return NULL;
    long r;
    Py_BEGIN_ALLOW_THREADS
    r = syscall(SYS_membarrier, command, 0, 0);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(r);
}

static PyMethodDef module_methods[] = {
    {"buffer_address", native_buffer_address, METH_O,
     "buffer_address(buffer) -> int: the address of a writable buffer's first byte."},
    {"futex_wait", native_futex_wait, METH_VARARGS,
     "futex_wait(address, expected, seconds) -> 0, EAGAIN, ETIMEDOUT or EINTR (shared futex, without "
     "the GIL); OSError otherwise."},
    {"futex_wake", native_futex_wake, METH_VARARGS,
     "futex_wake(address, count=INT_MAX) -> how many waiters woke (shared futex); OSError on failure."},
    {"mutex_init", native_mutex_init, METH_O,
     "mutex_init(address): initialise a process-shared robust mutex there; OSError on failure."},
#ifdef HAVE_CLOCKLOCK
    {"mutex_clocklock", native_mutex_clocklock, METH_VARARGS,
     "mutex_clocklock(address, deadline) -> 0 or the pthread error: wait (without the GIL) at most "
     "until deadline, a time.monotonic() value."},
#endif
    {"mutex_trylock", native_mutex_trylock, METH_O, "mutex_trylock(address) -> 0 or the pthread error."},
    {"mutex_unlock", native_mutex_unlock, METH_O, "mutex_unlock(address) -> 0 or the pthread error."},
    {"mutex_consistent", native_mutex_consistent, METH_O, "mutex_consistent(address) -> 0 or the pthread error."},
    {"spin_trylock", native_spin_trylock, METH_O, "spin_trylock(address) -> 0 or EBUSY."},
    {"membarrier", native_membarrier, METH_O,
     "membarrier(command) -> the membarrier(2) system call's result (-1 on failure), without the GIL."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kservice.plugins.mmap._ringfast.Ring",
    .tp_doc = PyDoc_STR("Ring(mapping, capacity, fence): the hot operations of one mapped ShmQueue."),
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
};

static struct PyModuleDef ringfast_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_ringfast",
    .m_doc = "Compiled put/pop of kservice's shared-memory ring (same protocol as ring.py), and the "
             "native primitives of _futex.py.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__ringfast(void)
{
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&ringfast_module);
    if (m == NULL)
        return NULL;
    empty_result = Py_BuildValue("(Oi)", Py_None, POP_EMPTY);
    corrupt_result = Py_BuildValue("(Oi)", Py_None, POP_CORRUPT);
    PyObject *layout = Py_BuildValue(
        "{s:i,s:i,s:i,s:I,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
        "LAYOUT_VERSION", LAYOUT_VERSION, "HEADER_SIZE", HEADER_SIZE, "FRAME", FRAME,
        "CHECK_KEY", (unsigned int)CHECK_KEY, "OFF_CLOSED", OFF_CLOSED, "OFF_RECOVERIES", OFF_RECOVERIES,
        "OFF_TAIL", OFF_TAIL, "OFF_DATA_SEQ", OFF_DATA_SEQ, "OFF_ASLEEP", OFF_ASLEEP, "OFF_HEAD", OFF_HEAD,
        "OFF_SPACE_SEQ", OFF_SPACE_SEQ, "OFF_SPACE_WAITERS", OFF_SPACE_WAITERS, "OFF_MUTEX", OFF_MUTEX);
    if (empty_result == NULL || corrupt_result == NULL || layout == NULL
        || PyModule_AddObject(m, "LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0
        || PyModule_AddIntConstant(m, "PUT_OK", PUT_OK) < 0
        || PyModule_AddIntConstant(m, "PUT_BUSY", PUT_BUSY) < 0
        || PyModule_AddIntConstant(m, "PUT_FULL", PUT_FULL) < 0
        || PyModule_AddIntConstant(m, "PUT_CLOSED", PUT_CLOSED) < 0
        || PyModule_AddIntConstant(m, "PUT_TOO_LARGE", PUT_TOO_LARGE) < 0
        || PyModule_AddIntConstant(m, "PUT_NOT_BUFFER", PUT_NOT_BUFFER) < 0
        || PyModule_AddIntConstant(m, "ANNOUNCE_ARRIVED", ANNOUNCE_ARRIVED) < 0
        || PyModule_AddIntConstant(m, "ANNOUNCE_DECLINED", ANNOUNCE_DECLINED) < 0
        || PyModule_AddIntConstant(m, "POP_OK", POP_OK) < 0
        || PyModule_AddIntConstant(m, "POP_WAKE", POP_WAKE) < 0
        || PyModule_AddIntConstant(m, "POP_EMPTY", POP_EMPTY) < 0
        || PyModule_AddIntConstant(m, "POP_CORRUPT", POP_CORRUPT) < 0
        || PyModule_AddObject(m, "FENCE_ADDRESS", PyLong_FromUnsignedLongLong((uintptr_t)&fence_word)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
