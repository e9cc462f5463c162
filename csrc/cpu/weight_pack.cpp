// Weight streams for the CPU microkernels, and a cache of them.
//
// Packing costs about one pass over O * C/g * kh * kw bytes, which for the larger YOLO layers is
// longer than the convolution itself at batch 1, so streams are cached across calls. An entry is
// valid while the very same tensors (same storage, offset, sizes, strides, dtype) are passed,
// their version counters have not moved (in-place updates such as `copy_` bump them), and their
// contents still match what was packed (content_check.h: writes through `.data` or numpy do not
// bump the counter). The cache holds weak references to the storages: a freed tensor's entry can
// never match a new tensor that reuses its address, because a weakly referenced StorageImpl is
// not deallocated. Inference tensors (weights made under torch.inference_mode) have no version
// counter, so every write to them goes unseen by it: their entries keep a byte copy of intweight
// too, compared in full on every hit (a memcmp per call, against repacking per call: a 3x3
// 256 -> 256 layer at 20x20 took 3.6x as long made under inference mode). Weights with gaps or
// overlaps (strided views) have no cheap content check: they are packed on every call.
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cstring>
#include <list>
#include <mutex>
#include <optional>

#include "cpu/content_check.h"
#include "cpu/dsconv2d_cpu.h"
#include "cpu/weight_pack.h"

namespace dsconv_ext {
namespace cpu {
namespace {

struct TensorId {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
  const c10::StorageImpl* impl = nullptr;
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  int64_t version = 0;
  bool present = false;
};

// Dense (contiguous in some order of its dimensions), so that the content check below reads
// exactly the tensor's bytes: numel bytes from data_ptr. Channels-last weights count:
// ultralytics' AutoBackend converts a PyTorch model to channels_last on x86 CPUs, and every 3x3
// layer's weights were then repacked on every predict call.
bool trackable(const at::Tensor& t) { return t.has_storage() && t.is_non_overlapping_and_dense(); }

// Packs done so far (a test hook: a cache hit packs nothing).
std::atomic<int64_t> g_packs{0};

size_t byte_size(const at::Tensor& t) { return size_t(t.numel()) * t.element_size(); }

// A byte copy of a small tensor (alpha, KDSb), compared in full on every hit.
std::vector<uint8_t> bytes_of(const at::Tensor* t) {
  if (t == nullptr) return {};
  const uint8_t* p = static_cast<const uint8_t*>(t->data_ptr());
  return std::vector<uint8_t>(p, p + byte_size(*t));
}

bool same_bytes(const std::vector<uint8_t>& saved, const at::Tensor* t) {
  if (t == nullptr) return saved.empty();
  return saved.size() == byte_size(*t) &&
         (saved.empty() || std::memcmp(saved.data(), t->data_ptr(), saved.size()) == 0);
}

uint64_t weight_hash(const at::Tensor& intweight) {
  return sampled_hash(intweight.data_ptr(), byte_size(intweight));
}

TensorId make_id(const at::Tensor* t) {
  TensorId id;
  if (t == nullptr) return id;
  id.present = true;
  id.storage = t->storage().getWeakStorageImpl();
  id.impl = t->storage().unsafeGetStorageImpl();
  id.data = t->data_ptr();
  id.sizes = t->sizes().vec();
  id.strides = t->strides().vec();
  id.dtype = t->scalar_type();
  id.version = t->is_inference() ? -1 : t->_version();
  return id;
}

bool same(const TensorId& id, const at::Tensor* t) {
  if (t == nullptr || !id.present) return t == nullptr && !id.present;
  // expired() first: the StorageImpl address is only meaningful while the weak ref is alive.
  return !id.storage->expired() && id.impl == t->storage().unsafeGetStorageImpl() &&
         id.data == t->data_ptr() && id.sizes == t->sizes().vec() &&
         id.strides == t->strides().vec() && id.dtype == t->scalar_type() &&
         id.version == (t->is_inference() ? -1 : t->_version());
}

// What was packed (see content_check.h): alpha's and KDSb's bytes, intweight's sampled hash,
// or for an inference tensor (no version counter) all of intweight's bytes.
struct Fingerprint {
  std::vector<uint8_t> alpha_bytes, kdsb_bytes, w_bytes;
  uint64_t w_hash = 0;

  Fingerprint(const at::Tensor& intweight, const at::Tensor& alpha, const at::Tensor* kb)
      : alpha_bytes(bytes_of(&alpha)),
        kdsb_bytes(bytes_of(kb)),
        w_bytes(intweight.is_inference() ? bytes_of(&intweight) : std::vector<uint8_t>()),
        w_hash(intweight.is_inference() ? 0 : weight_hash(intweight)) {}

  bool matches(const at::Tensor& intweight, const at::Tensor& alpha, const at::Tensor* kb) const {
    if (!same_bytes(alpha_bytes, &alpha) || !same_bytes(kdsb_bytes, kb)) return false;
    return intweight.is_inference() ? same_bytes(w_bytes, &intweight)
                                    : w_hash == weight_hash(intweight);
  }
};

struct Entry {
  TensorId w, a, b;
  int64_t block, elem_bytes, groups;
  bool amx_weights;
  std::shared_ptr<const PackedWeights> packed;
  std::shared_ptr<const Fingerprint> fp;
  size_t bytes() const {
    return packed->data.size() + fp->alpha_bytes.size() + fp->kdsb_bytes.size() +
           fp->w_bytes.size();
  }
};

constexpr size_t kMaxEntries = 512;
constexpr size_t kMaxBytes = size_t(512) << 20;

std::mutex g_mutex;
std::list<Entry> g_entries;  // most recently used first
size_t g_bytes = 0;

// Where each weight and each segment's header go, for one of the two stream layouts.
struct StreamLayout {
  int64_t otile;      // output channels per stream
  int64_t seg_bytes;  // per (block, tap): header, then weights
  int64_t hdr_bytes;  // [corr[otile],] alpha[otile], kdsb[otile]
  int elem_bytes;
  AmxK amx;  // amx_weights only
  bool amx_weights;
  // Byte offset from the segment's weights of channel k of the block, output row r.
  int64_t weight_at(int64_t K4, int64_t r, int64_t k) const {
    const int64_t k4 = k / 4, lane = k % 4;
    if (!amx_weights) return (((k4 * kOTile + r) * 4) + lane) * elem_bytes;
    const int64_t j = k4 / 16;  // the A tile that owns the group
    return j * amx.a_bytes() + r * 4 * amx.kc + (k4 - amx.start(K4, j)) * 4 + lane;
  }
};

std::shared_ptr<PackedWeights> pack(const at::Tensor& intweight, const at::Tensor& alpha,
                                    const c10::optional<at::Tensor>& KDSb, const Layout& lay,
                                    int elem_bytes, bool amx_weights) {
  const ConvGeometry& g = lay.g;
  const at::Tensor q = intweight.contiguous();
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  at::Tensor kb;
  if (KDSb.has_value()) kb = KDSb->to(at::kFloat).contiguous();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* ap = a.data_ptr<float>();
  const float* kp = kb.defined() ? kb.data_ptr<float>() : nullptr;

  static_assert(sizeof(SegHeader) == 12 * kOTile && sizeof(AmxSegHeader) == 8 * kAmxTile,
                "headers are [corr,] alpha, kdsb arrays");
  const int64_t K4 = lay.K4, ntaps = lay.ntaps;
  // Width 0 (AVX2): bytes where the largest |q| allows them (segments with a zero alpha are
  // packed as zeros, so do not count).
  const bool by_weights = elem_bytes == 0;
  int32_t max_abs_q = 0;
  if (by_weights) {
    const int64_t per_o = g.Cg * ntaps;
    for (int64_t o = 0; o < g.O; ++o) {
      for (int64_t c = 0; c < g.Cg; ++c) {
        for (int64_t t = 0; t < ntaps; ++t) {
          const int32_t v = std::abs(int32_t(qp[o * per_o + c * ntaps + t]));
          if (v > max_abs_q && ap[(o * g.nblk + c / g.block) * ntaps + t] != 0.f) max_abs_q = v;
        }
      }
    }
  }
  if (by_weights) elem_bytes = max_abs_q <= kByteMaxQ ? 1 : 2;
  StreamLayout sl{kOTile, 0, int64_t(sizeof(SegHeader)), elem_bytes, AmxK(K4), amx_weights};
  sl.seg_bytes = sl.hdr_bytes + K4 * kOTile * 4 * elem_bytes;
  if (amx_weights) {
    sl.otile = kAmxTile;
    sl.hdr_bytes = sizeof(AmxSegHeader);
    sl.seg_bytes = sl.amx.seg_bytes();
  }
  const int64_t T = sl.otile;
  auto pw = std::make_shared<PackedWeights>();
  pw->otiles = (g.Og + T - 1) / T;
  pw->elem_bytes = elem_bytes;
  pw->k4_run = by_weights && elem_bytes == 1 ? byte_k4_run(max_abs_q) : 0;
  pw->stream_bytes = g.nblk * ntaps * sl.seg_bytes;
  pw->data.assign(size_t(g.groups * pw->otiles * pw->stream_bytes), 0);

  std::vector<int32_t> corr(T);
  std::vector<float> alphas(T), kdsb(T);
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    for (int64_t ot = 0; ot < pw->otiles; ++ot) {
      uint8_t* s = pw->data.data() + (grp * pw->otiles + ot) * pw->stream_bytes;
      for (int64_t b = 0; b < g.nblk; ++b) {
        const int64_t c0 = block_begin(b, g.block), c1 = block_end(b, g.block, g.Cg);
        for (int64_t t = 0; t < ntaps; ++t) {
          uint8_t* wdst = s + sl.hdr_bytes;
          for (int64_t r = 0; r < T; ++r) {
            const int64_t o = ot * T + r;
            corr[r] = 0, alphas[r] = 1.f, kdsb[r] = 0.f;  // padding channels: never stored
            if (o >= g.Og) continue;
            const int64_t oo = grp * g.Og + o;
            const int8_t* qo = qp + oo * g.Cg * ntaps;
            const int64_t at_idx = (oo * g.nblk + b) * ntaps + t;
            // A zero alpha zeroes the segment whatever its integers: stored as zero weights and
            // alpha 1, so that every alpha the kernels see is nonzero (the AVX-512 fold adds E
            // to alpha's exponent bits).
            const bool zero = ap[at_idx] == 0.f;
            int32_t sum = 0;
            for (int64_t c = c0; c < c1; ++c) {
              const int8_t v = zero ? int8_t(0) : qo[c * ntaps + t];
              sum += v;
              uint8_t* dst = wdst + sl.weight_at(K4, r, c - c0);
              if (elem_bytes == 1 || amx_weights) {
                *dst = static_cast<uint8_t>(v);
              } else {
                const int16_t v16 = v;
                std::memcpy(dst, &v16, 2);
              }
            }
            corr[r] = -128 * sum;
            if (!zero) alphas[r] = ap[at_idx];
            kdsb[r] = kp ? kp[at_idx] : 0.f;
          }
          for (int64_t r = 0; r < T; ++r) {
            uint32_t bits;
            std::memcpy(&bits, &alphas[r], 4);
            const int32_t e = static_cast<int32_t>((bits >> 23) & 0xFF);
            pw->alpha_normal &= e != 0 && e != 255;
            pw->alpha_exp_min = std::min(pw->alpha_exp_min, e);
            pw->alpha_exp_max = std::max(pw->alpha_exp_max, e);
          }
          uint8_t* h = s;
          if (!amx_weights) {  // AMX multiplies the mantissas as signed bytes: no correction
            std::memcpy(h, corr.data(), 4 * T);
            h += 4 * T;
          }
          std::memcpy(h, alphas.data(), 4 * T);
          std::memcpy(h + 4 * T, kdsb.data(), 4 * T);
          s += sl.seg_bytes;
        }
      }
    }
  }
  return pw;
}

}  // namespace

int64_t weight_packs() { return g_packs.load(); }

std::shared_ptr<const PackedWeights> packed_weights(const at::Tensor& intweight,
                                                    const at::Tensor& alpha,
                                                    const c10::optional<at::Tensor>& KDSb,
                                                    const Layout& lay, int elem_bytes,
                                                    bool amx_weights) {
  const bool cacheable =
      trackable(intweight) && trackable(alpha) && (!KDSb.has_value() || trackable(*KDSb));
  if (!cacheable) {
    g_packs.fetch_add(1, std::memory_order_relaxed);
    return pack(intweight, alpha, KDSb, lay, elem_bytes, amx_weights);
  }
  const at::Tensor* kb = KDSb.has_value() ? &*KDSb : nullptr;
  std::shared_ptr<const PackedWeights> hit;
  std::shared_ptr<const Fingerprint> hit_fp;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_entries.begin(); it != g_entries.end(); ++it) {
      if (it->block == lay.g.block && it->elem_bytes == elem_bytes &&
          it->amx_weights == amx_weights && it->groups == lay.g.groups && same(it->w, &intweight) &&
          same(it->a, &alpha) && same(it->b, kb)) {
        g_entries.splice(g_entries.begin(), g_entries, it);
        hit = it->packed;
        hit_fp = it->fp;
        break;
      }
    }
  }
  if (hit) {
    // The same tensors at the same versions: still the same contents? Checked outside the lock
    // (a memcmp of alpha and KDSb, a sampled hash of intweight: content_check.h).
    if (hit_fp->matches(intweight, alpha, kb)) return hit;
    // Written behind the version counter's back: drop the entry, it can never match again.
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_entries.begin(); it != g_entries.end(); ++it) {
      if (it->fp == hit_fp) {
        g_bytes -= it->bytes();
        g_entries.erase(it);
        break;
      }
    }
  }
  // Pack outside the lock; a concurrent miss on the same weights packs twice, harmlessly. The
  // contents are fingerprinted before packing, so a write racing with the pack can only make
  // the next call miss, never make a stale pack look current.
  auto fp = std::make_shared<const Fingerprint>(intweight, alpha, kb);
  std::shared_ptr<const PackedWeights> packed =
      pack(intweight, alpha, KDSb, lay, elem_bytes, amx_weights);
  g_packs.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_entries.push_front(Entry{make_id(&intweight), make_id(&alpha), make_id(kb), lay.g.block,
                             elem_bytes, lay.g.groups, amx_weights, packed, std::move(fp)});
  g_bytes += g_entries.front().bytes();
  while (g_entries.size() > 1 && (g_entries.size() > kMaxEntries || g_bytes > kMaxBytes)) {
    g_bytes -= g_entries.back().bytes();
    g_entries.pop_back();
  }
  return packed;
}

}  // namespace cpu
}  // namespace dsconv_ext
