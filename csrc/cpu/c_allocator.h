// glibc's malloc settled for a model's steady state on the first CPU call; see c_allocator.cpp.
#pragma once

#include <string>

namespace dsconv_ext {
namespace cpu {

// First CPU call of the process: move glibc's malloc to a model's steady state.
void settle_c_allocator_once();
// What it did, or before the first call what it will do.
std::string c_allocator_state();

}  // namespace cpu
}  // namespace dsconv_ext
