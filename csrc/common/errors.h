// Thread-local last-error message of libmoe_fused (see moe_last_error()).
// Tiny and stable: used by common/api.cpp and by every backend (cpu/, cuda/).
//
//   return moe::set_error(MOE_ERR_SHAPE, "%s: expected %d dims", name, 3);
//
// set_error formats the message (printf-style) into the calling thread's
// buffer and returns `status`, so a failing check is one line.
#pragma once

#include "moe_fused.h"

namespace moe {

#if defined(__GNUC__) || defined(__clang__)
#define MOE_PRINTF_LIKE(fmt_index, first_arg) \
  __attribute__((format(printf, fmt_index, first_arg)))
#else
#define MOE_PRINTF_LIKE(fmt_index, first_arg)
#endif

// Sets this thread's last-error message and returns `status` unchanged.
moe_status_t set_error(moe_status_t status, const char *fmt, ...)
    MOE_PRINTF_LIKE(2, 3);

// Empties this thread's last-error message.
void clear_error();

// This thread's last-error message ("" if none).
const char *last_error();

}  // namespace moe
