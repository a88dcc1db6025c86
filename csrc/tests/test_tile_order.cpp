// The lead order of the row GEMMs' tile list (csrc/cuda/tile_order.h): the slots the plan
// kernel computes from per-expert scans must be the sequence the header defines, a
// permutation of the expert-order list, and expert order itself at lead 0.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "cuda/tile_order.h"

using moe::cuda::lead_slots;
using moe::cuda::lead_tiles;

namespace {

struct Placed {
  int expert, index;  // tile `index` of `expert`
  bool operator==(const Placed &o) const { return expert == o.expert && index == o.index; }
};

// The list as the header defines it: for x = 0, 1, ...: lead(x), then follow(x - lead).
std::vector<Placed> by_definition(const std::vector<int> &cnt, int lead) {
  const int E = int(cnt.size());
  std::vector<Placed> out;
  for (int x = 0; x < E + lead; ++x) {
    if (x < E)
      for (int i = 0; i < lead_tiles(cnt[x]); ++i) out.push_back({x, i});
    const int f = x - lead;
    if (f >= 0 && f < E)
      for (int i = lead_tiles(cnt[f]); i < cnt[f]; ++i) out.push_back({f, i});
  }
  return out;
}

// The list from the slots, as tiles_block_lead writes it.
std::vector<Placed> by_slots(const std::vector<int> &cnt, int lead) {
  const int E = int(cnt.size());
  std::vector<int32_t> lead_ex(E + 1, 0), follow_ex(E + 1, 0);
  for (int e = 0; e < E; ++e) {
    lead_ex[e + 1] = lead_ex[e] + lead_tiles(cnt[e]);
    follow_ex[e + 1] = follow_ex[e] + cnt[e] - lead_tiles(cnt[e]);
  }
  const int total = lead_ex[E] + follow_ex[E];
  std::vector<Placed> out(total, Placed{-1, -1});
  for (int e = 0; e < E; ++e) {
    const auto s = lead_slots(lead_ex.data(), follow_ex.data(), E, lead, e);
    for (int i = 0; i < cnt[e]; ++i) {
      const int64_t at = i < lead_tiles(cnt[e]) ? s.lead + i : s.follow + (i - lead_tiles(cnt[e]));
      EXPECT_GE(at, 0);
      EXPECT_LT(at, total);
      if (at < 0 || at >= total) continue;
      EXPECT_EQ(out[at].expert, -1) << "slot " << at << " taken twice (lead " << lead << ")";
      out[at] = Placed{e, i};
    }
  }
  return out;
}

TEST(TileOrder, SlotsMatchTheDefinitionAndCoverTheList) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int E = 1 + int(rng() % 40);
    std::vector<int> cnt(E);
    for (int &c : cnt) {
      const int kind = int(rng() % 5);  // empty, one tile, two, three, many
      c = kind == 0 ? 0 : kind == 1 ? 1 : kind == 2 ? 2 : kind == 3 ? 3 : 4 + int(rng() % 9);
    }
    for (int lead : {0, 1, 2, 3, 7, E, E + 3}) {
      const auto want = by_definition(cnt, lead);
      const auto got = by_slots(cnt, lead);
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_TRUE(got[i] == want[i]) << "slot " << i << " lead " << lead << " E " << E;
    }
  }
}

TEST(TileOrder, LeadZeroIsExpertOrder) {
  const std::vector<int> cnt = {3, 0, 1, 5, 2, 0, 4};
  const auto got = by_slots(cnt, 0);
  size_t at = 0;
  for (int e = 0; e < int(cnt.size()); ++e)
    for (int i = 0; i < cnt[e]; ++i, ++at) ASSERT_TRUE(got[at] == (Placed{e, i}));
}

TEST(TileOrder, FirstPairRunsLeadExpertsAhead) {
  // Four experts of 8 tiles, lead 2: the lead runs of experts 0..2 come before any follow
  // run, and expert 3's lead run before expert 1's follow run.
  const std::vector<int> cnt = {8, 8, 8, 8};
  const auto got = by_slots(cnt, 2);
  const std::vector<Placed> head = {{0, 0}, {0, 1}, {1, 0}, {1, 1}, {2, 0}, {2, 1}, {0, 2}};
  for (size_t i = 0; i < head.size(); ++i) ASSERT_TRUE(got[i] == head[i]) << i;
  ASSERT_TRUE(got[6 + 6] == (Placed{3, 0}));  // after expert 0's six follow tiles
  ASSERT_TRUE(got[6 + 6 + 2] == (Placed{1, 2}));
}

}  // namespace
