/* pool.c — a persistent thread pool that parks its workers instead of spinning.
 *
 * Why not OpenMP: inside vLLM workers it fights torch's runtime, and with the default spin policy it
 * stalled at 8/16 ms scheduler ticks on these 2-core machines whenever another process shared the
 * cores. Here a worker spins for at most PI_BACKEND_SPIN_US (default 50 us) after finishing a task,
 * which catches the back-to-back dispatches of one decode step, and then sleeps on a condition
 * variable. The caller is thread 0 and runs its share itself; a call with one thread never touches
 * the pool.
 *
 * Workers join a dispatch; they are not required for it. Tasks claim their work dynamically (ops.c),
 * so the caller alone can finish everything: when it runs out of work it closes the dispatch and waits
 * only for the workers that joined before that. A worker that is asleep, or has no core because other
 * processes hold them, therefore never delays a call it did not take part in. */
#include "kernels.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PI_CPU_RELAX() _mm_pause()
#else
#define PI_CPU_RELAX() ((void)0)
#endif

/* seat: the dispatch open for joining (generation << 16) and how many workers joined it; 0 = closed */
#define SEAT_GEN(s) ((s) >> 16)
#define SEAT_JOINED(s) ((int)((s) & 0xffffu))

typedef struct {
    pthread_mutex_t mu;           /* guards the sleep/wake handshakes */
    pthread_cond_t cv_work, cv_done;
    pthread_mutex_t dispatch_mu;  /* one dispatch at a time (callers from several Python threads) */
    _Atomic uint64_t generation;  /* bumped by every dispatch; workers wait for it to change */
    _Atomic uint64_t seat;
    _Atomic int done;             /* workers of the current dispatch that have finished */
    pi_task_fn fn;
    void *ctx;
    int nth;
    int n_workers;
    long spin_ns;
} pi_pool;

static pi_pool g_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
                         PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, NULL, NULL, 0, 0, -1};
static _Atomic int g_default_threads = 1;
static uint64_t g_start_generation[PI_MAX_THREADS + 1];
static _Thread_local int t_in_pool = 0; /* a task that dispatches again runs serially (no deadlock) */

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static long spin_budget_ns(void) {
    if (g_pool.spin_ns < 0) {
        const char *s = getenv("PI_BACKEND_SPIN_US");
        long us = s ? atol(s) : 50;
        g_pool.spin_ns = (us < 0 ? 0 : us > 10000 ? 10000 : us) * 1000L;
    }
    return g_pool.spin_ns;
}

/* take a seat in dispatch `gen` if it is still open and not full; the worker's tid, or 0 */
static int try_join(uint64_t gen) {
    uint64_t s = atomic_load_explicit(&g_pool.seat, memory_order_acquire);
    for (;;) {
        if (SEAT_GEN(s) != gen) return 0;
        /* fn, ctx and nth were published before the seat opened (release) and stay until it closes
         * and every joined worker is done */
        if (SEAT_JOINED(s) >= g_pool.nth - 1) return 0;
        if (atomic_compare_exchange_weak_explicit(&g_pool.seat, &s, s + 1, memory_order_acq_rel,
                                                  memory_order_acquire))
            return SEAT_JOINED(s) + 1;
    }
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    /* the generation current when this worker was created, not when it first runs: a dispatch issued
     * while the thread was still starting must not be missed */
    uint64_t seen = g_start_generation[id];
    t_in_pool = 1;
    for (;;) {
        /* brief bounded spin, then park */
        long deadline = now_ns() + spin_budget_ns();
        int spins = 0;
        while (atomic_load_explicit(&g_pool.generation, memory_order_acquire) == seen) {
            PI_CPU_RELAX();
            if (++spins % 64 == 0 && now_ns() > deadline) break;
        }
        if (atomic_load_explicit(&g_pool.generation, memory_order_acquire) == seen) {
            pthread_mutex_lock(&g_pool.mu);
            while (atomic_load_explicit(&g_pool.generation, memory_order_acquire) == seen)
                pthread_cond_wait(&g_pool.cv_work, &g_pool.mu);
            pthread_mutex_unlock(&g_pool.mu);
        }
        seen = atomic_load_explicit(&g_pool.generation, memory_order_acquire);
        const int tid = try_join(seen);
        if (!tid) continue; /* closed already (the caller did the work), or enough threads joined */
        g_pool.fn(g_pool.ctx, tid, g_pool.nth);
        atomic_fetch_add_explicit(&g_pool.done, 1, memory_order_acq_rel);
        pthread_mutex_lock(&g_pool.mu);
        pthread_cond_broadcast(&g_pool.cv_done);
        pthread_mutex_unlock(&g_pool.mu);
    }
    return NULL;
}

/* after fork() only the forking thread exists in the child: forget the workers, rebuild lazily */
static void pool_atfork_child(void) {
    pthread_mutex_init(&g_pool.mu, NULL);
    pthread_mutex_init(&g_pool.dispatch_mu, NULL);
    pthread_cond_init(&g_pool.cv_work, NULL);
    pthread_cond_init(&g_pool.cv_done, NULL);
    g_pool.n_workers = 0;
    atomic_store(&g_pool.seat, 0);
    atomic_store(&g_pool.done, 0);
}

static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, pool_atfork_child); }

/* grow to `want` workers; called with dispatch_mu held. Returns workers available. */
static int pool_grow(int want) {
    pthread_once(&g_atfork_once, register_atfork);
    while (g_pool.n_workers < want) {
        pthread_t th;
        pthread_attr_t attr;
        g_start_generation[g_pool.n_workers + 1] = atomic_load(&g_pool.generation);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(g_pool.n_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        g_pool.n_workers++;
    }
    return g_pool.n_workers;
}

void pi_pool_run(pi_task_fn fn, void *ctx, int nth) {
    if (nth <= 1 || t_in_pool) {
        if (nth <= 1) {
            fn(ctx, 0, 1);
        } else { /* nested: run every share here, in order */
            for (int t = 0; t < nth; t++) fn(ctx, t, nth);
        }
        return;
    }
    pthread_mutex_lock(&g_pool.dispatch_mu);
    int have = pool_grow(nth - 1);
    if (have + 1 < nth) nth = have + 1; /* could not create all threads: use fewer */
    if (nth <= 1) {
        pthread_mutex_unlock(&g_pool.dispatch_mu);
        fn(ctx, 0, 1);
        return;
    }
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    g_pool.nth = nth;
    atomic_store_explicit(&g_pool.done, 0, memory_order_relaxed);
    const uint64_t gen = atomic_load_explicit(&g_pool.generation, memory_order_relaxed) + 1;
    atomic_store_explicit(&g_pool.seat, gen << 16, memory_order_release);
    pthread_mutex_lock(&g_pool.mu);
    atomic_store_explicit(&g_pool.generation, gen, memory_order_release);
    pthread_cond_broadcast(&g_pool.cv_work);
    pthread_mutex_unlock(&g_pool.mu);

    t_in_pool = 1;
    fn(ctx, 0, nth);
    t_in_pool = 0;

    /* close the dispatch; wait for the workers that joined it */
    const int joined = SEAT_JOINED(atomic_exchange_explicit(&g_pool.seat, 0, memory_order_acq_rel));
    long deadline = now_ns() + spin_budget_ns();
    int spins = 0;
    while (atomic_load_explicit(&g_pool.done, memory_order_acquire) != joined) {
        PI_CPU_RELAX();
        if (++spins % 64 == 0 && now_ns() > deadline) break;
    }
    pthread_mutex_lock(&g_pool.mu);
    while (atomic_load_explicit(&g_pool.done, memory_order_acquire) != joined)
        pthread_cond_wait(&g_pool.cv_done, &g_pool.mu);
    pthread_mutex_unlock(&g_pool.mu);
    pthread_mutex_unlock(&g_pool.dispatch_mu);
}

int pi_set_num_threads(int n) {
    if (n < 1 || n > PI_MAX_THREADS) return PI_ERR_SHAPE;
    atomic_store(&g_default_threads, n);
    return PI_OK;
}

int pi_get_num_threads(void) { return atomic_load(&g_default_threads); }

int pi_pool_resolve_threads(int n_threads) {
    int n = n_threads > 0 ? n_threads : atomic_load(&g_default_threads);
    return n < 1 ? 1 : n > PI_MAX_THREADS ? PI_MAX_THREADS : n;
}
