// Host check of the routing algorithm of routing.cu, for machines without a GPU: the same pipeline
// and the same per-element functions (routing_layout.h), with a sequential loop in place of each
// grid, ++ in place of the counting atomics, a sequential scan in place of cub::DeviceScan and
// std::stable_sort in place of cub::DeviceRadixSort (both stable sorts of the same keys and
// values). What it cannot check is CUDA-specific: launches, grid-stride indexing, the atomics and
// CUB itself.
//
// Reads one routing problem from stdin and prints the five output tensors;
// tests/test_routing.py compares them with route_pairs_torch.
//   input:  n_tokens n_slots n_buckets, bucket_sizes[n_buckets], block_m[n_buckets],
//           indices[n_tokens * n_slots], keep[n_tokens * n_slots] (0 or 1), whitespace-separated
//   output: one line per tensor: its name, then its values
#include <algorithm>
#include <cstdint>
#include <iostream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "routing_layout.h"

namespace {

using molt_routing::BucketTable;
using molt_routing::Totals;

std::vector<int64_t> read_values(int64_t n) {
  std::vector<int64_t> values(n);
  for (auto& v : values) {
    if (!(std::cin >> v)) throw std::runtime_error("truncated input");
  }
  return values;
}

void print(const std::string& name, const std::vector<int64_t>& values) {
  std::cout << name;
  for (const int64_t v : values) std::cout << ' ' << v;
  std::cout << '\n';
}

}  // namespace

int main() {
  int64_t n_tokens = 0, n_slots = 0, n_buckets = 0;
  if (!(std::cin >> n_tokens >> n_slots >> n_buckets)) {
    std::cerr << "expected: n_tokens n_slots n_buckets\n";
    return 2;
  }
  const std::vector<int64_t> bucket_sizes = read_values(n_buckets);
  const std::vector<int64_t> block_m = read_values(n_buckets);
  const int64_t n_pairs = n_tokens * n_slots;
  const std::vector<int64_t> indices = read_values(n_pairs);
  const std::vector<int64_t> keep = read_values(n_pairs);
  const int64_t n_transforms =
      std::accumulate(bucket_sizes.begin(), bucket_sizes.end(), int64_t{0});

  BucketTable table;
  if (!molt_routing::make_bucket_table(n_tokens, n_slots, static_cast<int>(n_buckets),
                                       bucket_sizes.data(), block_m.data(), &table)) {
    std::cerr << "too many buckets\n";
    return 2;
  }

  // key_and_count
  std::vector<uint32_t> keys(n_pairs);
  std::vector<int64_t> counts(n_transforms, 0);
  for (int64_t p = 0; p < n_pairs; ++p) {
    keys[p] = molt_routing::pair_key(indices[p], keep[p] != 0, n_transforms);
    if (keys[p] != n_transforms) ++counts[keys[p]];
  }

  // fill_transform_totals, then the exclusive scan
  std::vector<Totals> before(n_transforms + 1);
  Totals running{0, 0};
  for (int64_t t = 0; t <= n_transforms; ++t) {
    before[t] = running;
    running = molt_routing::TotalsSum{}(
        running, molt_routing::transform_totals(t, counts.data(), n_transforms, table));
  }

  // fill_blocks_used
  std::vector<int64_t> blocks_used(n_buckets);
  for (int b = 0; b < n_buckets; ++b) {
    blocks_used[b] = molt_routing::bucket_blocks_used(b, table, before.data());
  }

  // the stable sort of (key, pair id)
  std::vector<int64_t> sorted_pairs(n_pairs);
  std::iota(sorted_pairs.begin(), sorted_pairs.end(), int64_t{0});
  std::stable_sort(sorted_pairs.begin(), sorted_pairs.end(),
                   [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  std::vector<uint32_t> sorted_keys(n_pairs);
  for (int64_t i = 0; i < n_pairs; ++i) sorted_keys[i] = keys[sorted_pairs[i]];

  // place_pairs, on pair_of_row preset to -1
  std::vector<int64_t> pair_of_row(table.first_row[n_buckets], -1);
  std::vector<int64_t> row_of_pair(n_pairs);
  for (int64_t i = 0; i < n_pairs; ++i) {
    molt_routing::place_sorted_pair(i, sorted_keys.data(), sorted_pairs.data(), n_transforms, table,
                                    before.data(), pair_of_row.data(), row_of_pair.data());
  }

  // fill_transform_of_block
  std::vector<int64_t> transform_of_block(table.first_block[n_buckets]);
  for (int64_t j = 0; j < table.first_block[n_buckets]; ++j) {
    transform_of_block[j] = molt_routing::transform_of_block_at(j, table, before.data());
  }

  print("pair_of_row", pair_of_row);
  print("row_of_pair", row_of_pair);
  print("transform_of_block", transform_of_block);
  print("blocks_used", blocks_used);
  print("pair_counts", counts);
  return 0;
}
