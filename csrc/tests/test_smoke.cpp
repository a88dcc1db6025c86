#include <gtest/gtest.h>
#include "moe_fused.h"
TEST(Smoke, Abi) { EXPECT_EQ(moe_abi_version(), MOE_ABI_VERSION); }
