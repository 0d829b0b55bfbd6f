/* The thread pool: a step runs on a team, the calling thread plus workers that spin on sense-reversing
 * barriers inside the step and, between steps, spin briefly and then sleep on a condition variable. (OpenMP's
 * idle threads keep spinning after a region ends, taking a core from the Python side of the engine and from the
 * server's event loop; here they let go within ~0.5 ms.) The pool lives for the process; one step runs at a time.
 * Part of decode.c, which #includes it after ti_decode.h and the parts before it: not compiled alone.
 */

#define MAX_THREADS 256
#define IDLE_SPINS 20000

typedef struct {
    atomic_int count, sense;
} Barrier;

typedef struct {
    int tid, n, sense;
    Barrier *bar;
} Team;

static void barrier(Team *t) {
    if (t->n == 1) return;
    int s = !t->sense;
    t->sense = s;
    if (atomic_fetch_add_explicit(&t->bar->count, 1, memory_order_acq_rel) == t->n - 1) {
        atomic_store_explicit(&t->bar->count, 0, memory_order_relaxed);
        atomic_store_explicit(&t->bar->sense, s, memory_order_release);
    } else {
        while (atomic_load_explicit(&t->bar->sense, memory_order_acquire) != s) cpu_relax();
    }
}

/* This thread's share [lo, hi) of n iterations (static, contiguous: consecutive iterations share weights). */
static inline void span(const Team *t, int n, int *lo, int *hi) {
    *lo = (int)((long long)n * t->tid / t->n);
    *hi = (int)((long long)n * (t->tid + 1) / t->n);
}

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int num_workers, active, pid;
    atomic_uint generation;
    atomic_int finished, idle_spins;  /* idle_spins: how long workers spin for the next job after this one */
    void (*fn)(void *, Team *);
    void *arg;
    Barrier bar;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, NULL, NULL, {0, 0}};
static pthread_mutex_t step_mu = PTHREAD_MUTEX_INITIALIZER;

static void *worker_main(void *arg) {
    /* arg: the generation current when the thread was created (its first step is the next one) and its id */
    int tid = (int)((uintptr_t)arg & 0xffff);
    unsigned seen = (unsigned)((uintptr_t)arg >> 16);
    for (;;) {
        const int spins = atomic_load_explicit(&pool.idle_spins, memory_order_relaxed);
        unsigned g = atomic_load_explicit(&pool.generation, memory_order_acquire);
        for (int i = 0; i < spins && g == seen; i++) {
            cpu_relax();
            g = atomic_load_explicit(&pool.generation, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&pool.mu);
            while ((g = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = g;
        if (tid >= pool.active) continue;
        Team t = {tid, pool.active, 0, &pool.bar};
        pool.fn(pool.arg, &t);
        atomic_fetch_add_explicit(&pool.finished, 1, memory_order_release);
    }
    return NULL;
}

static void after_fork_in_child(void) {  /* the workers did not come along */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&step_mu, NULL);
    pool.num_workers = 0;
}

/* Run fn on nthreads threads (this one included); returns when all have finished. Afterwards the workers spin for
 * idle_spins pauses before they sleep: decode steps follow each other within a millisecond, but a kernel called in
 * the middle of torch ops (prefill) passes 0, or the spinning workers would slow torch's own threads. */
static void run_team(int nthreads, void (*fn)(void *, Team *), void *arg, int idle_spins) {
    nthreads = nthreads < 1 ? 1 : nthreads > MAX_THREADS ? MAX_THREADS : nthreads;
    if (pool.pid != getpid()) {
        if (pool.pid == 0) pthread_atfork(NULL, NULL, after_fork_in_child);
        pool.pid = getpid();
        pool.num_workers = 0;
    }
    while (pool.num_workers < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        uintptr_t arg = ((uintptr_t)atomic_load(&pool.generation) << 16) | (uintptr_t)(pool.num_workers + 1);
        int rc = pthread_create(&th, &attr, worker_main, (void *)arg);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.num_workers++;
    }
    if (nthreads > pool.num_workers + 1) nthreads = pool.num_workers + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.active = nthreads;
    atomic_store(&pool.idle_spins, idle_spins);
    atomic_store(&pool.finished, 0);
    atomic_store(&pool.bar.count, 0);
    atomic_store(&pool.bar.sense, 0);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    Team t = {0, nthreads, 0, &pool.bar};
    fn(arg, &t);
    while (atomic_load_explicit(&pool.finished, memory_order_acquire) < nthreads - 1) cpu_relax();
}
