// Layout arithmetic of the routing op (molt_kernels/ops/routing), shared by the CUDA kernels
// (routing.cu) and the host check (routing_host_check.cpp). Every value a kernel writes is computed
// by a function here, so the host check runs these exact code paths, with a sequential loop in
// place of each grid and std::stable_sort in place of CUB's stable radix sort. Plain C++: it
// compiles without CUDA.
#pragma once

#include <cassert>
#include <cstdint>

#ifdef __CUDACC__
#define MOLT_HD __host__ __device__ __forceinline__
#else
#define MOLT_HD inline
#endif

namespace molt_routing {

// The bucket table reaches the kernels by value, as a kernel parameter: no host-to-device copy, so
// the op stays free of host synchronisation and can be captured in a CUDA graph. Buckets are rank
// groups (a handful in practice); this bound keeps the parameter block far below CUDA's 4 KiB
// limit.
constexpr int kMaxBuckets = 32;

struct BucketTable {
  int n_buckets;
  int64_t first_transform[kMaxBuckets + 1];  // global id of each bucket's first transform, then T
  int64_t block_m[kMaxBuckets];
  int64_t first_block[kMaxBuckets + 1];  // Routing.block_start
  int64_t first_row[kMaxBuckets + 1];    // Routing.row_start
};

// Exclusive-scan element: pairs and padded blocks of the transforms before a transform.
struct Totals {
  int64_t pairs;
  int64_t blocks;
};

struct TotalsSum {
  MOLT_HD Totals operator()(const Totals& a, const Totals& b) const {
    return {a.pairs + b.pairs, a.blocks + b.blocks};
  }
};

MOLT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Same bound as block_capacity() in molt_kernels/ops/routing/__init__.py (the proof is there).
MOLT_HD int64_t block_capacity(int64_t n_tokens, int64_t n_slots, int64_t n_transforms,
                               int64_t block_m) {
  const int64_t pairs = n_tokens * min64(n_slots, n_transforms);
  return pairs / block_m + min64(n_transforms, pairs);
}

// Fills `table` with each bucket's region; false when there are more than kMaxBuckets buckets.
inline bool make_bucket_table(int64_t n_tokens, int64_t n_slots, int n_buckets,
                              const int64_t* bucket_sizes, const int64_t* block_m,
                              BucketTable* table) {
  if (n_buckets < 0 || n_buckets > kMaxBuckets) return false;
  table->n_buckets = n_buckets;
  table->first_transform[0] = table->first_block[0] = table->first_row[0] = 0;
  for (int b = 0; b < n_buckets; ++b) {
    const int64_t cap = block_capacity(n_tokens, n_slots, bucket_sizes[b], block_m[b]);
    table->block_m[b] = block_m[b];
    table->first_transform[b + 1] = table->first_transform[b] + bucket_sizes[b];
    table->first_block[b + 1] = table->first_block[b] + cap;
    table->first_row[b + 1] = table->first_row[b] + cap * block_m[b];
  }
  return true;
}

// The b with starts[b] <= x < starts[b + 1] (starts ascending, starts[0] <= x < starts[n]); the
// smallest b with starts[b + 1] > x skips the empty ranges of empty buckets.
MOLT_HD int find_bucket(const int64_t* starts, int n, int64_t x) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (starts[mid + 1] > x) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Sort key of a pair: its transform, or the sentinel T for a dropped pair so that it sorts after
// every kept pair. T < 2^32 - 1 is checked by the caller; unsigned keys need no sign handling in
// the radix sort. An id out of range would count out of bounds: trap instead, as torch's own
// indexing does.
MOLT_HD uint32_t pair_key(int64_t transform, bool keep, int64_t n_transforms) {
  assert(!keep || (0 <= transform && transform < n_transforms));
  return static_cast<uint32_t>(keep ? transform : n_transforms);
}

// Scan input for transform t < T; t == T is a zero sentinel, so that the exclusive scan over T + 1
// entries ends with the grand totals and before[t + 1] exists for every transform.
MOLT_HD Totals transform_totals(int64_t t, const int64_t* counts, int64_t n_transforms,
                                const BucketTable& table) {
  if (t == n_transforms) return {0, 0};
  const int64_t m = table.block_m[find_bucket(table.first_transform, table.n_buckets, t)];
  return {counts[t], (counts[t] + m - 1) / m};
}

MOLT_HD int64_t bucket_blocks_used(int b, const BucketTable& table, const Totals* before) {
  return before[table.first_transform[b + 1]].blocks - before[table.first_transform[b]].blocks;
}

// Writes the row of the pair at position i of the sorted order. The sort is stable over ascending
// pair ids, so transform t's pairs sit at sorted positions [before[t].pairs, before[t + 1].pairs)
// in ascending pair id, and i - before[t].pairs is the pair's rank within its transform.
MOLT_HD void place_sorted_pair(int64_t i, const uint32_t* sorted_keys, const int64_t* sorted_pairs,
                               int64_t n_transforms, const BucketTable& table, const Totals* before,
                               int64_t* pair_of_row, int64_t* row_of_pair) {
  const int64_t t = sorted_keys[i];
  const int64_t pair = sorted_pairs[i];
  if (t == n_transforms) {
    row_of_pair[pair] = -1;
    return;
  }
  const int b = find_bucket(table.first_transform, table.n_buckets, t);
  const int64_t blocks_before = before[t].blocks - before[table.first_transform[b]].blocks;
  const int64_t row = table.first_row[b] + blocks_before * table.block_m[b] + i - before[t].pairs;
  // block_capacity assumes a token selects a transform at most once; a repeated selection could
  // overflow the bucket's region.
  assert(row < table.first_row[b + 1]);
  pair_of_row[row] = pair;
  row_of_pair[pair] = row;
}

// Transform owning block j of the whole layout, or -1 for a block past its bucket's blocks_used.
// A binary search per block rather than a loop per transform: a hot transform owns thousands of
// blocks, so per-transform work would be badly unbalanced.
MOLT_HD int64_t transform_of_block_at(int64_t j, const BucketTable& table, const Totals* before) {
  const int b = find_bucket(table.first_block, table.n_buckets, j);
  const int64_t t_begin = table.first_transform[b];
  const int64_t t_end = table.first_transform[b + 1];
  const int64_t base = before[t_begin].blocks;
  const int64_t local = j - table.first_block[b];
  if (local >= before[t_end].blocks - base) return -1;
  // The smallest t whose blocks end past `local`; transforms with no pairs end where the previous
  // one does, so they are never chosen.
  int64_t lo = t_begin, hi = t_end - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (before[mid + 1].blocks - base > local) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

}  // namespace molt_routing
