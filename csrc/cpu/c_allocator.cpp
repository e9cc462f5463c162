// Puts glibc's malloc into the state a model's steady state needs, once, on the first CPU call.
//
// By default glibc serves every block above its mmap threshold (128 KiB at start, raised to the
// size of a freed mmapped block, at most 32 MiB) with a fresh mmap that is unmapped on free, and
// returns the heap's free top to the OS beyond twice that threshold. A detection model's
// activations are MiBs each, so a process keeps faulting its outputs in anew on every forward:
// the faults cost more than the convolutions. Converted yolo11n at 640 px on two Zen 5 cores in
// a plain script: batch 1, up to 8,100 page faults and 25 ms per forward against none and
// 14-15 ms here; batch 8, 208-227 ms against 105-123 ms (the 32 MiB cap leaves batch-8
// activations mmapped however the dynamic threshold moves, hence mallopt).
//
// So the first CPU call sets the mmap threshold to 256 MiB and the trim threshold to 512 MiB:
// blocks up to 256 MiB come from the heap and stay mapped for reuse, and at most 512 MiB of free
// heap top is kept from the OS. This is a process-wide choice, so it is skipped when the user has
// tuned malloc through glibc's environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
// GLIBC_TUNABLES) and when DSCONV_EXT_SETTLE_ALLOCATOR=0; other allocators (jemalloc, tcmalloc
// preloaded) do not read glibc's settings and are left as they are.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "cpu/c_allocator.h"

namespace dsconv_ext {
namespace cpu {

namespace {

constexpr int kMmapThresholdBytes = 256 << 20;
constexpr int kTrimThresholdBytes = 512 << 20;

constexpr const char* kSettled =
    "settled (glibc: blocks up to 256 MiB from the heap, trim above 512 MiB)";

std::once_flag settle_once;
std::atomic<const char*> settle_state{nullptr};

bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0';
}

// Why the allocator is to be left alone, or null where the settle applies.
const char* reason_to_leave_alone() {
#if defined(__GLIBC__)
  const char* env = std::getenv("DSCONV_EXT_SETTLE_ALLOCATOR");
  if (env != nullptr && std::strcmp(env, "0") == 0)
    return "left alone (DSCONV_EXT_SETTLE_ALLOCATOR=0)";
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (env_set("MALLOC_MMAP_THRESHOLD_") || env_set("MALLOC_TRIM_THRESHOLD_") ||
      (tunables != nullptr && std::strstr(tunables, "glibc.malloc.") != nullptr))
    return "left alone (malloc tuned through the environment)";
  return nullptr;
#else
  return "left alone (not glibc)";
#endif
}

}  // namespace

void settle_c_allocator_once() {
  std::call_once(settle_once, [] {
    const char* why = reason_to_leave_alone();
#if defined(__GLIBC__)
    // The trim threshold first: setting either turns glibc's dynamic threshold off.
    if (why == nullptr)
      why = mallopt(M_TRIM_THRESHOLD, kTrimThresholdBytes) == 1 &&
                    mallopt(M_MMAP_THRESHOLD, kMmapThresholdBytes) == 1
                ? kSettled
                : "left alone (glibc refused the thresholds)";
#endif
    settle_state = why;
  });
}

std::string c_allocator_state() {
  if (const char* done = settle_state.load()) return done;
  // Before the first call: what it will do.
  const char* why = reason_to_leave_alone();
  return why != nullptr ? why : std::string("pending: ") + kSettled + " on the first CPU call";
}

}  // namespace cpu
}  // namespace dsconv_ext

TORCH_LIBRARY_FRAGMENT(dsconv_ext, m) {
  // What settle_c_allocator_once did in this process, or will do on the first CPU call.
  m.def("cpu_allocator_state() -> str",
        []() -> std::string { return dsconv_ext::cpu::c_allocator_state(); });
}
