// Puts glibc's malloc into the state a model's steady state needs, once, on the first CPU call.
//
// glibc serves every block above its mmap threshold (128 KiB at start) with a fresh mmap and
// unmaps it on free; the threshold only rises, to the size of a freed mmapped block (at most
// 32 MiB), when such a block is freed, and the heap's free top is returned to the OS beyond twice
// the threshold. A detection model's activations are a few MiB each, so a process that has not
// yet freed a block near the cap keeps faulting its outputs in anew on every forward: converted
// yolo11n at 640 px on two Zen 5 cores paid 4,800-6,700 page faults and 19-23 ms per forward,
// against none and 14-16 ms once settled (and the float model 49-56 ms against 33-41 ms). One
// malloc/free of a block just under the cap is what glibc would see after any larger tensor:
// blocks up to 31 MiB then come from the heap, which is trimmed past 62 MiB of free top. Other
// allocators (jemalloc, tcmalloc preloaded) take the call as an ordinary allocation.
// DSCONV_EXT_SETTLE_ALLOCATOR=0 leaves the allocator alone.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "cpu/dsconv2d_cpu.h"

namespace dsconv_ext {
namespace cpu {

namespace {

constexpr size_t kSettleBytes = size_t(31) << 20;

std::once_flag settle_once;
std::atomic<const char*> settle_state{"pending: no CPU DSConv call yet"};

bool disabled_by_env() {
  const char* env = std::getenv("DSCONV_EXT_SETTLE_ALLOCATOR");
  return env != nullptr && std::strcmp(env, "0") == 0;
}

}  // namespace

void settle_c_allocator_once() {
  std::call_once(settle_once, [] {
#if defined(__GLIBC__)
    if (disabled_by_env()) {
      settle_state = "left alone (DSCONV_EXT_SETTLE_ALLOCATOR=0)";
      return;
    }
    // volatile: the compiler may otherwise drop a malloc whose block is never used.
    void* volatile block = std::malloc(kSettleBytes);
    std::free(block);
    settle_state = "settled (glibc: blocks up to 31 MiB from the heap)";
#else
    settle_state = "left alone (not glibc)";
#endif
  });
}

const char* c_allocator_state() { return settle_state.load(); }

}  // namespace cpu
}  // namespace dsconv_ext

TORCH_LIBRARY_FRAGMENT(dsconv_ext, m) {
  // What settle_c_allocator_once did in this process, for `info` and tests.
  m.def("cpu_allocator_state() -> str",
        []() -> std::string { return dsconv_ext::cpu::c_allocator_state(); });
}
