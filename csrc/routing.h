// Host API of the routing kernels (routing.cu). Torch-free, so routing.cu compiles with nvcc alone;
// the torch op in routing_torch.cpp allocates the tensors and calls it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "routing_layout.h"

namespace molt_routing {

// Outputs, all int64 and contiguous, sized as in molt_kernels.ops.routing.Routing.
struct RoutingOutputs {
  int64_t* pair_of_row;         // [table.first_row[n_buckets]]
  int64_t* row_of_pair;         // [n_pairs]
  int64_t* transform_of_block;  // [table.first_block[n_buckets]]
  int64_t* blocks_used;         // [n_buckets]
  int64_t* pair_counts;         // [n_transforms]
};

// Bytes of scratch memory route_pairs_launch needs; a pure function of the sizes.
cudaError_t route_pairs_workspace_bytes(int64_t n_pairs, int64_t n_transforms, size_t* bytes);

// Enqueues the routing of `n_pairs` flat (token, slot) pairs on `stream`; never synchronises.
// Requires 0 <= indices[p] < n_transforms for kept pairs and n_transforms < 2^32 - 1.
cudaError_t route_pairs_launch(const int64_t* indices, const bool* keep, int64_t n_pairs,
                               int64_t n_transforms, const BucketTable& table,
                               const RoutingOutputs& out, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);

}  // namespace molt_routing
