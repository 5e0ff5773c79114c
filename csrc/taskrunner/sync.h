/* Mutex, condition variable and monotonic clock for the scheduler core.
 *
 * Thin wrappers over POSIX threads, so the Cython core can lock and wait
 * without the GIL.  Condition variables time out against CLOCK_MONOTONIC
 * where the platform allows it, so a wall-clock jump never stretches or
 * cuts short a `timeout=`.
 */
#ifndef TASKRUNNER_SYNC_H
#define TASKRUNNER_SYNC_H

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <time.h>

typedef pthread_mutex_t tr_mutex_t;
typedef pthread_cond_t tr_cond_t;

#if defined(__APPLE__)
#define TR_COND_CLOCK CLOCK_REALTIME
#else
#define TR_COND_CLOCK CLOCK_MONOTONIC
#endif

static inline double tr_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline int tr_mutex_init(tr_mutex_t *m) { return pthread_mutex_init(m, NULL); }
static inline void tr_mutex_destroy(tr_mutex_t *m) { pthread_mutex_destroy(m); }
static inline void tr_mutex_lock(tr_mutex_t *m) { pthread_mutex_lock(m); }
static inline void tr_mutex_unlock(tr_mutex_t *m) { pthread_mutex_unlock(m); }

static inline int tr_cond_init(tr_cond_t *c) {
    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc) return rc;
#if !defined(__APPLE__)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
#endif
    rc = pthread_cond_init(c, &attr);
    pthread_condattr_destroy(&attr);
    return rc;
}
static inline void tr_cond_destroy(tr_cond_t *c) { pthread_cond_destroy(c); }
static inline void tr_cond_signal(tr_cond_t *c) { pthread_cond_signal(c); }
static inline void tr_cond_broadcast(tr_cond_t *c) { pthread_cond_broadcast(c); }

/* Wait until `deadline` (a tr_monotonic() time; negative means forever).
 * Returns 1 once the deadline has passed, 0 otherwise (woken or spurious). */
static inline int tr_cond_wait_until(tr_cond_t *c, tr_mutex_t *m, double deadline) {
    if (deadline < 0) {
        pthread_cond_wait(c, m);
        return 0;
    }
    double now = tr_monotonic();
    if (now >= deadline) return 1;
    struct timespec ts;
    clock_gettime(TR_COND_CLOCK, &ts);
    double target = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + (deadline - now);
    double whole = floor(target);
    ts.tv_sec = (time_t)whole;
    ts.tv_nsec = (long)((target - whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec += 1; ts.tv_nsec -= 1000000000L; }
    return pthread_cond_timedwait(c, m, &ts) == ETIMEDOUT;
}

/* Sequentially consistent loads and stores of 64-bit words in memory shared
 * between processes: a worker announces the run it starts, then checks
 * whether it was told to stop; the parent says stop, then reads what was
 * started.  With both sides sequentially consistent, at least one of them
 * sees the other's store. */
static inline void tr_store64(volatile long long *p, long long v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
static inline long long tr_load64(volatile long long *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
/* A store no load of this thread waits behind: ordered after what the
 * thread did before it (a release store: a plain move on x86), for words the
 * other side reads without the store-then-load handshake above. */
static inline void tr_release64(volatile long long *p, long long v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

#endif
