// parallel_for_tasks(n, f): run f(begin, end) over [0, n) on torch's intra-op threads.
//
// Why not plain at::parallel_for: with torch's OpenMP backend (the pip wheels), at::parallel_for
// is a header template around `#pragma omp parallel`. An extension compiled without -fopenmp (the
// default of torch.utils.cpp_extension, and of this project's JIT loader) silently drops the
// pragma and runs every "parallel" loop on the calling thread. In that case we open the same
// OpenMP team ourselves through libgomp's entry point, which torch has already loaded, so the
// threads are torch's own and torch.set_num_threads applies. Built with -fopenmp (or against a
// torch with the native thread pool) this is at::parallel_for.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP) && defined(__GNUC__) && defined(__linux__)
#define DSCONV_EXT_GOMP_DIRECT 1
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
int omp_get_thread_num(void);
int omp_get_num_threads(void);
}
#endif

namespace dsconv_ext {
namespace cpu {

#ifdef DSCONV_EXT_GOMP_DIRECT
namespace detail {
template <typename F>
struct GompJob {
  int64_t n;
  const F* f;
  std::exception_ptr error;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  static void run(void* p) {
    auto* job = static_cast<GompJob*>(p);
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t chunk = (job->n + nt - 1) / nt;
    const int64_t b = tid * chunk, e = std::min(job->n, b + chunk);
    if (b >= e) return;
    try {
      (*job->f)(b, e);
    } catch (...) {
      if (!job->failed.test_and_set()) job->error = std::current_exception();
    }
  }
};
}  // namespace detail
#endif

template <typename F>
void parallel_for_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
#ifdef DSCONV_EXT_GOMP_DIRECT
  const int threads = at::get_num_threads();
  if (n == 1 || threads <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  detail::GompJob<F> job;
  job.n = n;
  job.f = &f;
  GOMP_parallel(&detail::GompJob<F>::run, &job,
                static_cast<unsigned>(std::min<int64_t>(threads, n)), 0);
  if (job.error) std::rethrow_exception(job.error);
#else
  at::parallel_for(0, n, 1, f);
#endif
}

// Number of distinct threads that ran tasks of one parallel_for_tasks over `n` tasks: lets the
// tests check that the kernel really runs multi-threaded, without timing anything.
int parallel_probe(int64_t n);

}  // namespace cpu
}  // namespace dsconv_ext
