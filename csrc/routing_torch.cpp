// The torch op molt_kernels::route_pairs_cuda: allocates the outputs and the workspace with the
// caching allocator and enqueues the kernels of routing.cu on the current stream. Host code only
// (no CUDA kernels here), so it needs torch's C++ headers but not nvcc.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "routing.h"

namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> route_pairs_cuda(const Tensor& indices,
                                                                    const Tensor& keep,
                                                                    c10::IntArrayRef bucket_sizes,
                                                                    c10::IntArrayRef block_m) {
  TORCH_CHECK(indices.is_cuda(), "route_pairs_cuda: indices must be a CUDA tensor");
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong,
              "route_pairs_cuda: indices must be int64 [n_tokens, n_slots]");
  TORCH_CHECK(keep.sizes() == indices.sizes() && keep.scalar_type() == at::kBool &&
                  keep.device() == indices.device(),
              "route_pairs_cuda: keep must be bool, shaped and placed like indices");
  TORCH_CHECK(bucket_sizes.size() == block_m.size(), "route_pairs_cuda: one block_m per bucket");
  int64_t n_transforms = 0;
  for (size_t b = 0; b < bucket_sizes.size(); ++b) {
    TORCH_CHECK(bucket_sizes[b] >= 0 && block_m[b] > 0,
                "route_pairs_cuda: bucket sizes must be >= 0 and block_m > 0");
    n_transforms += bucket_sizes[b];
  }
  // Sort keys are uint32 and T itself is the key of dropped pairs.
  TORCH_CHECK(n_transforms < std::numeric_limits<uint32_t>::max(),
              "route_pairs_cuda: fewer than 2^32 - 1 transforms");

  const c10::cuda::CUDAGuard guard(indices.device());
  const Tensor idx = indices.contiguous();
  const Tensor kp = keep.contiguous();
  const int64_t n_tokens = idx.size(0);
  const int64_t n_slots = idx.size(1);
  const int64_t n_pairs = n_tokens * n_slots;

  const std::vector<int64_t> sizes(bucket_sizes.begin(), bucket_sizes.end());
  const std::vector<int64_t> ms(block_m.begin(), block_m.end());
  molt_routing::BucketTable table;
  TORCH_CHECK(molt_routing::make_bucket_table(n_tokens, n_slots, static_cast<int>(sizes.size()),
                                              sizes.data(), ms.data(), &table),
              "route_pairs_cuda: at most ", molt_routing::kMaxBuckets, " buckets");

  const auto opts = idx.options();
  Tensor pair_of_row = at::empty({table.first_row[table.n_buckets]}, opts);
  Tensor row_of_pair = at::empty({n_pairs}, opts);
  Tensor transform_of_block = at::empty({table.first_block[table.n_buckets]}, opts);
  Tensor blocks_used = at::empty({table.n_buckets}, opts);
  Tensor pair_counts = at::empty({n_transforms}, opts);
  size_t workspace_bytes = 0;
  C10_CUDA_CHECK(
      molt_routing::route_pairs_workspace_bytes(n_pairs, n_transforms, &workspace_bytes));
  Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, opts.dtype(at::kByte));

  const molt_routing::RoutingOutputs out{
      pair_of_row.data_ptr<int64_t>(), row_of_pair.data_ptr<int64_t>(),
      transform_of_block.data_ptr<int64_t>(), blocks_used.data_ptr<int64_t>(),
      pair_counts.data_ptr<int64_t>()};
  C10_CUDA_CHECK(molt_routing::route_pairs_launch(
      idx.data_ptr<int64_t>(), kp.data_ptr<bool>(), n_pairs, n_transforms, table, out,
      workspace.data_ptr(), workspace_bytes, c10::cuda::getCurrentCUDAStream()));
  return {pair_of_row, row_of_pair, transform_of_block, blocks_used, pair_counts};
}

}  // namespace

// A fragment: other ops of the package may register in the same namespace from Python.
TORCH_LIBRARY_FRAGMENT(molt_kernels, m) {
  m.def(
      "route_pairs_cuda(Tensor indices, Tensor keep, int[] bucket_sizes, int[] block_m)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(molt_kernels, CUDA, m) { m.impl("route_pairs_cuda", &route_pairs_cuda); }
