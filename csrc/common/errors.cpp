#include "common/errors.h"

#include <cstdarg>
#include <cstdio>

namespace moe {
namespace {
thread_local char g_last_error[1024] = {0};
}  // namespace

moe_status_t set_error(moe_status_t status, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
  va_end(args);
  return status;
}

void clear_error() { g_last_error[0] = '\0'; }

const char *last_error() { return g_last_error; }

}  // namespace moe

extern "C" {

MOE_API int32_t moe_abi_version(void) { return MOE_ABI_VERSION; }

MOE_API const char *moe_last_error(void) { return moe::last_error(); }

MOE_API int32_t moe_has_cuda(void) {
#ifdef MOE_FUSED_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
