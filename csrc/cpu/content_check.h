// Content fingerprints for the packed-weight cache (weight_pack.cpp). Torch-free, so that the
// per-call cost can be timed on its own.
//
// Why: the cache is keyed on tensor identity and version counters, and some writes do not bump
// the counter: through `.data` (a new tensor sharing the storage, with its own counter), through
// numpy (`t.numpy()[...] = ...`), through `from_blob` aliases or raw pointers. So a cache hit is
// also checked against the tensors' current contents: alpha and KDSb in full (they are small, a
// copy is kept and compared byte for byte), intweight by the hash below.
//
// What the sampled hash can miss: a write to intweight that changes no sampled byte. The hash
// reads the first and last kEdgeBytes bytes and kSamples 8-byte words spread evenly over the
// tensor (tensors up to kFullHashBytes are hashed in full), so a write that changes every byte
// of some contiguous run is seen as soon as the run is longer than the gap between two sampled
// words, (bytes - 8) / (kSamples - 1) - 8. For the largest YOLO11s layer (512 x 512 x 3 x 3 =
// 2.36 MB) that gap is ~2.3 KB, half an output channel (4608 bytes): rewriting any whole output
// channel, or the whole tensor (`.data.neg_()`, `.data.copy_(other)`, numpy `w[:] = ...`), is
// seen; a write of a few scattered elements (`w.data[3, 7, 1, 1] = 5`) can go unseen, and so can
// a rewrite that happens to leave every sampled byte as it was. Accepted because (a) every write
// through the tensor's own version counter (in-place ops, `copy_`, `load_state_dict`,
// optimiser steps) is caught exactly, whatever it touches; (b) the writes that bypass the counter
// in practice rewrite whole tensors or channels; (c) a full hash is a pass over intweight on
// every call: measured ~420 us for that layer with cold caches, ~15% of its batch-1 20x20
// convolution on one core, against ~14 us for these samples. A caller that edits a few weights
// behind the counter's back can bump it with any in-place op (`intweight.add_(0)`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace dsconv_ext {
namespace cpu {

constexpr size_t kFullHashBytes = 4096;
constexpr size_t kEdgeBytes = 64;
constexpr size_t kSamples = 1024;

namespace detail {
inline uint64_t mix(uint64_t h, uint64_t word, uint64_t pos) {
  // Position-dependent so that moving bytes around changes the hash too.
  h ^= (word + 0x9E3779B97F4A7C15ull * (pos + 1));
  h *= 0xBF58476D1CE4E5B9ull;
  return h ^ (h >> 31);
}

inline uint64_t load8(const uint8_t* p, size_t n, size_t off) {
  uint64_t w = 0;
  std::memcpy(&w, p + off, n - off < 8 ? n - off : 8);
  return w;
}

inline uint64_t hash_range(uint64_t h, const uint8_t* p, size_t n, size_t begin, size_t end) {
  for (size_t off = begin; off < end; off += 8) h = mix(h, load8(p, n, off), off);
  return h;
}
}  // namespace detail

// Hash of `n` bytes at `p`: all of them up to kFullHashBytes, else the edges and kSamples words.
inline uint64_t sampled_hash(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint64_t h = 0x84222325CBF29CE4ull ^ n;
  if (n <= kFullHashBytes) return detail::hash_range(h, p, n, 0, n);
  h = detail::hash_range(h, p, n, 0, kEdgeBytes);
  h = detail::hash_range(h, p, n, n - kEdgeBytes, n);
  // Independent loads (no address depends on an earlier one), so the cache misses overlap.
  const size_t span = n - 8;
  for (size_t i = 0; i < kSamples; ++i) {
    const size_t off = span / (kSamples - 1) * i + span % (kSamples - 1) * i / (kSamples - 1);
    h = detail::mix(h, detail::load8(p, n, off), off);
  }
  return h;
}

}  // namespace cpu
}  // namespace dsconv_ext
