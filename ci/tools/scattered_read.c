/* scattered_read.c -- how fast this machine reads scattered rows when nothing is computed on them: the
 * access pattern of the sparse kernels at a given density, without their arithmetic. Sorted random rows
 * of ROW_BYTES drawn from a matrix of MATRIX_ROWS rows (a huge-page buffer), the caches flushed between
 * repeats, each thread prefetching AHEAD rows ahead, as the kernels do. A Q4_0 row of a 4096-wide matrix
 * is 2304 bytes, F16 8192; a 7B FFN matrix has 11008 rows, so 10% density is 1100 of them.
 *
 *   cc -O2 -mavx2 -o /tmp/scattered_read ci/tools/scattered_read.c -lpthread
 *   /tmp/scattered_read ROW_BYTES N_ROWS AHEAD THREADS [MATRIX_ROWS [DISJOINT]]   e.g. 2304 1100 8 2 11008 1
 *
 * DISJOINT = 1 draws a repeat's sets as disjoint slices of one permutation (what the kernel suite's
 * benchmarks do): no set finds another's rows in L3. With 0 (the default) each set is drawn on its own,
 * and on a matrix that fits in L3 later sets hit earlier sets' rows, which overstates the bandwidth.
 * ci/bench_kernels.py runs it beside the sparse kernels (test_plain_scattered_read).
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static uint8_t *buf;
static int64_t row_bytes, n_rows_total, n_idx, ahead;
static int32_t *idx;

typedef struct { int tid, nth; uint64_t sum; } span;
enum { SETS = 8 }; /* disjoint active sets read back to back, as consecutive decode steps would */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void read_span(span *s, int64_t lo, int64_t hi) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t k = lo; k < hi; k++) {
        if (k + ahead < hi) {
            const uint8_t *q = buf + (int64_t)idx[k + ahead] * row_bytes;
            for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch((const char *)q + o, _MM_HINT_T1);
        }
        const uint8_t *r = buf + (int64_t)idx[k] * row_bytes;
        for (int64_t o = 0; o + 32 <= row_bytes; o += 32) acc = _mm256_add_epi64(acc, _mm256_loadu_si256((const __m256i *)(r + o)));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, acc);
    s->sum += lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

/* this thread's share of every set, set after set */
static void read_rows(span *s) {
    for (int64_t set = 0; set < SETS; set++)
        read_span(s, set * n_idx + n_idx * s->tid / s->nth, set * n_idx + n_idx * (s->tid + 1) / s->nth);
}

/* persistent threads (thread start-up is not what is measured): a barrier starts and ends each repeat */
static pthread_barrier_t start, done;
static int reps_left;

static void *worker(void *p) {
    for (;;) {
        pthread_barrier_wait(&start);
        if (reps_left < 0) return NULL;
        read_rows(p);
        pthread_barrier_wait(&done);
    }
}

static int by_value(const void *a, const void *b) { return *(const int32_t *)a - *(const int32_t *)b; }

static int64_t rand_below(int64_t n) { return (int64_t)(((uint64_t)rand() * 2654435761u) % (uint64_t)n); }

int main(int argc, char **argv) {
    if (argc < 5 || argc > 7) {
        fprintf(stderr, "usage: %s ROW_BYTES N_ROWS AHEAD THREADS [MATRIX_ROWS [DISJOINT]]\n", argv[0]);
        return 2;
    }
    const int disjoint = argc == 7 && atoi(argv[6]) != 0;
    row_bytes = atoll(argv[1]); n_idx = atoll(argv[2]); ahead = atoll(argv[3]);
    int nth = atoi(argv[4]);
    const int64_t matrix_rows = argc >= 6 ? atoll(argv[5]) : 11008;
    const size_t flush_bytes = (size_t)200 << 20;
    if (row_bytes < 64 || n_idx < 1 || nth < 1 || nth > 64 || matrix_rows < 1 || matrix_rows > INT32_MAX ||
        row_bytes > ((int64_t)1 << 40) / matrix_rows) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    n_rows_total = matrix_rows;
    const size_t size = ((size_t)(matrix_rows * row_bytes) + ((size_t)2 << 20) - 1) & ~(((size_t)2 << 20) - 1);
    if (n_idx > n_rows_total) n_idx = n_rows_total;
    buf = aligned_alloc((size_t)2 << 20, size);
    uint8_t *flush = malloc(flush_bytes);
    idx = malloc((size_t)n_idx * SETS * sizeof(int32_t));
    int32_t *perm = malloc((size_t)n_rows_total * sizeof(int32_t));
    if (!buf || !flush || !idx || !perm) { fprintf(stderr, "out of memory\n"); return 1; }
    for (int64_t i = 0; i < n_rows_total; i++) perm[i] = (int32_t)i;
    madvise(buf, size, MADV_HUGEPAGE);
    memset(buf, 1, size);
    memset(flush, 0, flush_bytes);
    pthread_t th[64];
    span s[64];
    pthread_barrier_init(&start, NULL, (unsigned)nth);
    pthread_barrier_init(&done, NULL, (unsigned)nth);
    for (int t = 0; t < nth; t++) s[t] = (span){t, nth, 0};
    for (int t = 1; t < nth; t++) pthread_create(&th[t], NULL, worker, &s[t]);
    double total = 0, best = 1e9;
    const int reps = 20;
    for (int rep = 0; rep < reps; rep++) {
        if (disjoint) /* a fresh permutation; set k takes its slice k (wrapping past SETS * N_ROWS > rows) */
            for (int64_t i = n_rows_total - 1; i > 0; i--) {
                const int64_t j = rand_below(i + 1);
                const int32_t t = perm[i];
                perm[i] = perm[j];
                perm[j] = t;
            }
        for (int set = 0; set < SETS; set++) {
            int32_t *one = idx + set * n_idx;
            for (int64_t i = 0; i < n_idx; i++)
                one[i] = disjoint ? perm[(set * n_idx + i) % n_rows_total] : (int32_t)rand_below(n_rows_total);
            qsort(one, (size_t)n_idx, sizeof(int32_t), by_value);
        }
        volatile uint64_t f = 0;
        for (size_t i = 0; i < flush_bytes; i += 64) f += flush[i];
        const double t0 = now();
        pthread_barrier_wait(&start);
        read_rows(&s[0]);
        pthread_barrier_wait(&done);
        const double dt = now() - t0;
        total += dt;
        if (dt < best) best = dt;
    }
    reps_left = -1;
    pthread_barrier_wait(&start);
    for (int t = 1; t < nth; t++) pthread_join(th[t], NULL);
    uint64_t check = 0;
    for (int t = 0; t < nth; t++) check += s[t].sum;
    printf("rows of %lld bytes, %d sets of %lld rows, %lld ahead, %d threads: mean %.1f GB/s, best %.1f GB/s (%llu)\n",
           (long long)row_bytes, SETS, (long long)n_idx, (long long)ahead, nth, SETS * n_idx * row_bytes / (total / reps) / 1e9,
           SETS * n_idx * row_bytes / best / 1e9, (unsigned long long)(check & 1));
    return 0;
}
