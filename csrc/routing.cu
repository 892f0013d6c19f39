// Routing kernels: group the kept (token, slot) pairs by transform, each transform's rows padded to
// its bucket's BLOCK_M, bit-identical to molt_kernels/ops/routing/torch.py. No limit on the number
// of transforms (nothing is sized by T in shared memory) and no host synchronisation: every size
// comes from shapes.
//
// Pipeline, all on one stream:
//   1. key_and_count: sort key per pair (its transform, or T if dropped) and kept pairs per
//      transform with global atomics (an integer sum: the result does not depend on their order).
//   2. transform_totals + cub::DeviceScan: exclusive scan of (pairs, padded blocks) over T + 1
//      entries, giving each transform's first sorted position and its first block in the layout.
//   3. bucket_blocks_used: one difference of the scan per bucket.
//   4. cub::DeviceRadixSort of (key, pair id), pair ids in ascending order. LSD radix sort is
//      stable, so each transform's pairs come out in ascending pair id; the rank of a pair within
//      its transform is its sorted position minus the transform's first position. This is what
//      makes the order deterministic, where per-transform atomic cursors would not be.
//   5. place_pairs: pair_of_row (-1 preset on padding rows) and row_of_pair (-1 for dropped pairs).
//   6. fill_transform_of_block: a binary search of the block scan for each block of the layout.
//
// Torch-free (see routing.h); the per-element arithmetic is in routing_layout.h.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "routing.h"

namespace molt_routing {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; this many blocks fills every current GPU several times over.
constexpr int64_t kMaxGridBlocks = 8192;
// Alignment of each workspace buffer: CUB's own allocation granule.
constexpr size_t kWorkspaceAlign = 256;

int grid_for(int64_t n) {
  return static_cast<int>(min64((n + kThreads - 1) / kThreads, kMaxGridBlocks));
}

#define MOLT_GRID_STRIDE(i, n)                                                           \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

#define MOLT_RETURN_IF_ERROR(expr)        \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

static_assert(sizeof(unsigned long long) == sizeof(int64_t), "atomicAdd on int64 counts");

__global__ void key_and_count(const int64_t* __restrict__ indices, const bool* __restrict__ keep,
                              int64_t n_pairs, int64_t n_transforms, uint32_t* __restrict__ keys,
                              int64_t* __restrict__ pair_ids, int64_t* __restrict__ counts) {
  MOLT_GRID_STRIDE(p, n_pairs) {
    const uint32_t key = pair_key(indices[p], keep[p], n_transforms);
    keys[p] = key;
    pair_ids[p] = p;
    if (key != n_transforms) {
      atomicAdd(reinterpret_cast<unsigned long long*>(counts + key), 1ULL);
    }
  }
}

__global__ void fill_transform_totals(const int64_t* __restrict__ counts, int64_t n_transforms,
                                      const __grid_constant__ BucketTable table,
                                      Totals* __restrict__ totals) {
  MOLT_GRID_STRIDE(t, n_transforms + 1) {
    totals[t] = transform_totals(t, counts, n_transforms, table);
  }
}

__global__ void fill_blocks_used(const __grid_constant__ BucketTable table,
                                 const Totals* __restrict__ before,
                                 int64_t* __restrict__ blocks_used) {
  const int b = threadIdx.x;
  if (b < table.n_buckets) blocks_used[b] = bucket_blocks_used(b, table, before);
}

__global__ void place_pairs(const uint32_t* __restrict__ sorted_keys,
                            const int64_t* __restrict__ sorted_pairs, int64_t n_pairs,
                            int64_t n_transforms, const __grid_constant__ BucketTable table,
                            const Totals* __restrict__ before, int64_t* __restrict__ pair_of_row,
                            int64_t* __restrict__ row_of_pair) {
  MOLT_GRID_STRIDE(i, n_pairs) {
    place_sorted_pair(i, sorted_keys, sorted_pairs, n_transforms, table, before, pair_of_row,
                      row_of_pair);
  }
}

__global__ void fill_transform_of_block(int64_t n_blocks, const __grid_constant__ BucketTable table,
                                        const Totals* __restrict__ before,
                                        int64_t* __restrict__ transform_of_block) {
  MOLT_GRID_STRIDE(j, n_blocks) { transform_of_block[j] = transform_of_block_at(j, table, before); }
}

// Keys lie in [0, T]; sorting only their significant bits saves radix passes.
int key_bits(int64_t n_transforms) {
  int bits = 1;
  while ((int64_t{1} << bits) <= n_transforms) ++bits;
  return bits;
}

size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

// Byte offsets of the scratch buffers inside the one workspace allocation.
struct Workspace {
  size_t keys_in, keys_out, pairs_in, pairs_out, totals, before, cub_temp;
  size_t cub_bytes;  // shared by the scan and the sort, which run one after the other
  size_t total;
};

cudaError_t plan_workspace(int64_t n_pairs, int64_t n_transforms, Workspace* ws) {
  size_t sort_bytes = 0, scan_bytes = 0;
  MOLT_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), n_pairs, 0,
      key_bits(n_transforms)));
  MOLT_RETURN_IF_ERROR(cub::DeviceScan::ExclusiveScan(
      nullptr, scan_bytes, static_cast<const Totals*>(nullptr), static_cast<Totals*>(nullptr),
      TotalsSum{}, Totals{0, 0}, n_transforms + 1));
  const size_t keys = align_up(sizeof(uint32_t) * n_pairs);
  const size_t pairs = align_up(sizeof(int64_t) * n_pairs);
  const size_t totals = align_up(sizeof(Totals) * (n_transforms + 1));
  ws->keys_in = 0;
  ws->keys_out = ws->keys_in + keys;
  ws->pairs_in = ws->keys_out + keys;
  ws->pairs_out = ws->pairs_in + pairs;
  ws->totals = ws->pairs_out + pairs;
  ws->before = ws->totals + totals;
  ws->cub_temp = ws->before + totals;
  ws->cub_bytes = sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
  ws->total = ws->cub_temp + align_up(ws->cub_bytes);
  return cudaSuccess;
}

template <typename T>
T* at_offset(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

}  // namespace

cudaError_t route_pairs_workspace_bytes(int64_t n_pairs, int64_t n_transforms, size_t* bytes) {
  Workspace ws;
  MOLT_RETURN_IF_ERROR(plan_workspace(n_pairs, n_transforms, &ws));
  *bytes = ws.total;
  return cudaSuccess;
}

cudaError_t route_pairs_launch(const int64_t* indices, const bool* keep, int64_t n_pairs,
                               int64_t n_transforms, const BucketTable& table,
                               const RoutingOutputs& out, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  Workspace ws;
  MOLT_RETURN_IF_ERROR(plan_workspace(n_pairs, n_transforms, &ws));
  if (workspace_bytes < ws.total) return cudaErrorInvalidValue;
  auto* keys_in = at_offset<uint32_t>(workspace, ws.keys_in);
  auto* keys_out = at_offset<uint32_t>(workspace, ws.keys_out);
  auto* pairs_in = at_offset<int64_t>(workspace, ws.pairs_in);
  auto* pairs_out = at_offset<int64_t>(workspace, ws.pairs_out);
  auto* totals = at_offset<Totals>(workspace, ws.totals);
  auto* before = at_offset<Totals>(workspace, ws.before);
  void* cub_temp = at_offset<char>(workspace, ws.cub_temp);
  const int64_t n_rows = table.first_row[table.n_buckets];
  const int64_t n_blocks = table.first_block[table.n_buckets];

  // Empty outputs may have null data pointers: skip them rather than memset a null pointer.
  if (n_transforms > 0) {
    MOLT_RETURN_IF_ERROR(
        cudaMemsetAsync(out.pair_counts, 0, sizeof(int64_t) * n_transforms, stream));
  }
  if (n_rows > 0) {
    // All-ones bytes are -1 in two's complement: padding rows keep it, kept pairs overwrite it.
    MOLT_RETURN_IF_ERROR(cudaMemsetAsync(out.pair_of_row, 0xFF, sizeof(int64_t) * n_rows, stream));
  }
  if (n_pairs > 0) {
    key_and_count<<<grid_for(n_pairs), kThreads, 0, stream>>>(indices, keep, n_pairs, n_transforms,
                                                              keys_in, pairs_in, out.pair_counts);
    MOLT_RETURN_IF_ERROR(cudaGetLastError());
  }
  fill_transform_totals<<<grid_for(n_transforms + 1), kThreads, 0, stream>>>(
      out.pair_counts, n_transforms, table, totals);
  MOLT_RETURN_IF_ERROR(cudaGetLastError());
  size_t cub_bytes = ws.cub_bytes;
  MOLT_RETURN_IF_ERROR(
      cub::DeviceScan::ExclusiveScan(cub_temp, cub_bytes, static_cast<const Totals*>(totals),
                                     before, TotalsSum{}, Totals{0, 0}, n_transforms + 1, stream));
  if (table.n_buckets > 0) {
    fill_blocks_used<<<1, kMaxBuckets, 0, stream>>>(table, before, out.blocks_used);
    MOLT_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (n_pairs > 0) {
    cub_bytes = ws.cub_bytes;
    MOLT_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(cub_temp, cub_bytes, keys_in, keys_out,
                                                         pairs_in, pairs_out, n_pairs, 0,
                                                         key_bits(n_transforms), stream));
    place_pairs<<<grid_for(n_pairs), kThreads, 0, stream>>>(keys_out, pairs_out, n_pairs,
                                                            n_transforms, table, before,
                                                            out.pair_of_row, out.row_of_pair);
    MOLT_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (n_blocks > 0) {
    fill_transform_of_block<<<grid_for(n_blocks), kThreads, 0, stream>>>(n_blocks, table, before,
                                                                         out.transform_of_block);
    MOLT_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace molt_routing
