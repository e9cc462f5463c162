// Fused routed attention for CPU inference (fp32, AVX-512): the CPU twin of the Triton forward.
//
// One task per (batch, query window, head): the task packs the keys (transposed) and values of
// its topk routed regions straight from the un-duplicated kv tensor, then for each block of 32
// queries computes the logits with an 8x32 register-blocked micro-kernel, a row softmax with a
// vectorised exp, and the output with an R x (16*NV) micro-kernel. Everything a task touches
// stays in L2; no gathered copy of kv and no attention matrix exist outside a task.
//
// Why not scaled_dot_product_attention: on AMD CPUs its fp32 GEMMs run through MKL's AVX2 path,
// which reached a third of the AVX-512 FMA peak here; this kernel does the arithmetic itself.
//
// Threads: torch's OpenMP team. With torch's OpenMP build at::parallel_for is a header template
// around `#pragma omp parallel`, which a build without -fopenmp drops; this file then opens the
// team through libgomp's GOMP_parallel (already loaded by torch), so torch.set_num_threads holds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <vector>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP) && defined(__GNUC__) && defined(__linux__)
#define BRA_GOMP 1
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
int omp_get_thread_num(void);
int omp_get_num_threads(void);
}
#endif

namespace {

constexpr int kRows = 8;      // query rows per logits micro-kernel
constexpr int kBlockM = 32;   // query rows per softmax block (multiple of kRows)
constexpr int kCols = 32;     // key columns per logits micro-kernel (two vectors)

template <typename F>
struct Job {
  int64_t n;
  const F* f;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
};

template <typename F>
void run_job(void* p) {
  auto* job = static_cast<Job<F>*>(p);
#ifdef BRA_GOMP
  const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
  const int64_t nt = 1, tid = 0;
#endif
  const int64_t chunk = (job->n + nt - 1) / nt;
  const int64_t b = tid * chunk, e = std::min(job->n, b + chunk);
  if (b >= e) return;
  try {
    (*job->f)(b, e);
  } catch (...) {
    if (!job->failed.exchange(true)) job->error = std::current_exception();
  }
}

template <typename F>
void parallel_tasks(int64_t n, const F& f) {
#ifdef BRA_GOMP
  const int threads = at::get_num_threads();
  if (n > 1 && threads > 1 && !at::in_parallel_region()) {
    Job<F> job;
    job.n = n;
    job.f = &f;
    GOMP_parallel(&run_job<F>, &job, static_cast<unsigned>(std::min<int64_t>(threads, n)), 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  f(0, n);
#else
  at::parallel_for(0, n, 1, f);
#endif
}

// exp for x <= 0 (logits minus their row maximum): Cody-Waite range reduction and the Cephes
// degree-5 polynomial, about 1 ulp; 2^n applied with scalef.
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// s[r][j0:j0+32] = sum_d q[r][d] * kt[d][j0:j0+32] for kRows rows (q pre-scaled).
inline void logits_8x32(const float* q, int64_t dk, const float* kt, int64_t lp, float* s) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dk; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * lp), k1 = _mm512_loadu_ps(kt + d * lp + 16);
    for (int r = 0; r < kRows; ++r) {
      const __m512 qv = _mm512_set1_ps(q[r * dk + d]);
      acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(s + r * lp, acc[r][0]);
    _mm512_storeu_ps(s + r * lp + 16, acc[r][1]);
  }
}

// o[r][:] = sum_{j<l} p[r][j] * v[j][:] for R rows and NV vectors of output channels.
template <int R, int NV>
inline void values_rxnv(const float* p, int64_t lp, const float* v, int64_t l, float* o) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < l; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * NV * 16 + c * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 pv = _mm512_set1_ps(p[r * lp + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pv, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * NV * 16 + c * 16, acc[r][c]);
}

template <int NV>
void values_block(const float* p, int64_t lp, const float* v, int64_t l, int64_t rows, float* o) {
  constexpr int R = NV <= 3 ? 8 : NV <= 6 ? 4 : 2;  // R*NV accumulators within 32 registers
  for (int64_t r0 = 0; r0 < rows; r0 += R)
    values_rxnv<R, NV>(p + r0 * lp, lp, v, l, o + r0 * NV * 16);
}

using ValuesFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*);
constexpr ValuesFn kValues[8] = {values_block<1>, values_block<2>, values_block<3>,
                                 values_block<4>, values_block<5>, values_block<6>,
                                 values_block<7>, values_block<8>};

at::Tensor routed_attention_fwd(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& idx,
                                const std::optional<at::Tensor>& weight, double scale,
                                int64_t heads) {
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "routed_attention_cpu: CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat,
              "routed_attention_cpu: float32 only");
  TORCH_CHECK(q.dim() == 4 && kv.dim() == 4 && idx.dim() == 3, "routed_attention_cpu: ranks");
  TORCH_CHECK(q.stride(3) == 1 && kv.stride(3) == 1, "routed_attention_cpu: channels contiguous");
  const int64_t B = q.size(0), P = q.size(1), Wq = q.size(2), Wk = kv.size(2);
  const int64_t H = heads, DK = q.size(3) / H, DV = (kv.size(3) - q.size(3)) / H;
  const int64_t K = idx.size(2), L = K * Wk, Lp = (L + kCols - 1) / kCols * kCols;
  const int64_t NV = (DV + 15) / 16;
  TORCH_CHECK(NV >= 1 && NV <= 8 && DK >= 1, "routed_attention_cpu: head sizes");
  TORCH_CHECK(kv.size(0) == B && kv.size(1) == P && idx.size(0) == B && idx.size(1) == P,
              "routed_attention_cpu: shapes");
  const auto idx_c = idx.to(at::kLong).contiguous();
  const at::Tensor w_c = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();
  auto out = at::empty({B, P, Wq, H * DV}, q.options());

  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  const float* wp = w_c.defined() ? w_c.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = kv.stride(0), ks1 = kv.stride(1), ks2 = kv.stride(2);
  const ValuesFn values = kValues[NV - 1];
  const float fscale = static_cast<float>(scale);

  parallel_tasks(B * P * H, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(DK * Lp), vp(L * NV * 16), qs(kBlockM * DK), s(kBlockM * Lp),
        ob(kBlockM * NV * 16), inv(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (P * H), p = task / H % P, h = task % H;
      // -- pack this window's routed keys (transposed, zero-padded) and values --
      for (int64_t d = 0; d < DK; ++d) std::fill(kt.data() + d * Lp + L, kt.data() + (d + 1) * Lp, 0.0f);
      for (int64_t t = 0; t < K; ++t) {
        const int64_t r = ip[(b * P + p) * K + t];
        TORCH_CHECK(r >= 0 && r < P, "routed_attention_cpu: region index out of range");
        const float wt = wp ? wp[(b * P + p) * K + t] : 1.0f;
        for (int64_t j = 0; j < Wk; ++j) {
          const float* row = kvp + b * ks0 + r * ks1 + j * ks2;
          const int64_t col = t * Wk + j;
          for (int64_t d = 0; d < DK; ++d) kt[d * Lp + col] = row[h * DK + d] * wt;
          const float* vrow = row + H * DK + h * DV;
          float* vdst = vp.data() + col * NV * 16;
          for (int64_t d = 0; d < DV; ++d) vdst[d] = vrow[d] * wt;
          std::fill(vdst + DV, vdst + NV * 16, 0.0f);
        }
      }
      for (int64_t m0 = 0; m0 < Wq; m0 += kBlockM) {
        const int64_t rows = std::min<int64_t>(kBlockM, Wq - m0);
        const int64_t rows_p = (rows + kRows - 1) / kRows * kRows;  // padded rows are zeros
        std::fill(qs.begin(), qs.end(), 0.0f);
        for (int64_t r = 0; r < rows; ++r) {
          const float* qrow = qp + b * qs0 + p * qs1 + (m0 + r) * qs2 + h * DK;
          for (int64_t d = 0; d < DK; ++d) qs[r * DK + d] = qrow[d] * fscale;
        }
        for (int64_t r0 = 0; r0 < rows_p; r0 += kRows)
          for (int64_t j0 = 0; j0 < Lp; j0 += kCols)
            logits_8x32(qs.data() + r0 * DK, DK, kt.data() + j0, Lp, s.data() + r0 * Lp + j0);
        // -- softmax over the L real columns; probabilities overwrite the logits --
        const __mmask16 tail = static_cast<__mmask16>((1u << (L % 16)) - 1u);
        const int64_t full = L / 16 * 16;
        for (int64_t r = 0; r < rows_p; ++r) {
          float* row = s.data() + r * Lp;
          __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
          for (int64_t j = 0; j < full; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + j));
          if (L % 16) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, row + full));
          const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < full; j += 16) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(row + j), m));
            _mm512_storeu_ps(row + j, e);
            sum = _mm512_add_ps(sum, e);
          }
          if (L % 16) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + full), m));
            _mm512_mask_storeu_ps(row + full, tail, e);
            sum = _mm512_mask_add_ps(sum, tail, sum, e);
          }
          inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        values(s.data(), Lp, vp.data(), L, rows_p, ob.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = op + (((b * P + p) * Wq + m0 + r) * H + h) * DV;
          const float* src = ob.data() + r * NV * 16;
          for (int64_t d = 0; d < DV; ++d) dst[d] = src[d] * inv[r];
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(dsconv_ext_bra_cpu, m) {
  m.def("attn_fwd(Tensor q, Tensor kv, Tensor r_idx, Tensor? r_weight, float scale, int heads) "
        "-> Tensor");
  m.impl("attn_fwd", c10::DispatchKey::CPU, &routed_attention_fwd);
}
