// The CPU gate's top-k selection as one torch op, molt_kernels::topk_lowest_index_cpu.
//
// Why C++: in PyTorch the exact tie rule costs a handful of elementwise passes over the [N, T]
// activations to build order-preserving int64 keys, then a top-k over them; here each row is one
// pass that keeps the k best (key, id) pairs in an insertion-sorted array.
//
// Order (the reference's stable descending sort): larger values first, equal values by lower id;
// -0.0 equals +0.0; NaN ranks above +inf, every NaN equal (so NaNs go by id too).
// Rows are independent, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// Rows per parallel task: a row is ~T comparisons, so batch enough of them per task.
constexpr int64_t kRowsPerTask = 256;

// A signed integer whose order is the order above (NaN highest, -0.0 == +0.0).
template <typename scalar_t>
auto order_key(scalar_t v) {
  using key_t = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;
  constexpr key_t kMax = std::numeric_limits<key_t>::max();
  if (std::isnan(v)) return kMax;
  if (v == scalar_t(0)) return key_t(0);
  key_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  // Negative floats order backwards as signed integers: flip their magnitude bits.
  return bits < 0 ? key_t(bits ^ kMax) : bits;
}

// indices[n, :k] = ids of the k largest values of values[n, :T], in rank order.
template <typename scalar_t>
void select_rows(const scalar_t* values, int64_t n_cols, int64_t k, int64_t row0, int64_t row1,
                 int64_t* indices) {
  using key_t = decltype(order_key(scalar_t(0)));
  std::vector<key_t> best_key(k);
  for (int64_t n = row0; n < row1; ++n) {
    const scalar_t* row = values + n * n_cols;
    int64_t* best_id = indices + n * k;
    int64_t filled = 0;
    for (int64_t j = 0; j < n_cols; ++j) {
      const key_t key = order_key(row[j]);
      // Strictly larger only: an equal key seen later has the higher id, so it ranks below.
      if (filled == k && key <= best_key[k - 1]) continue;
      int64_t pos = filled < k ? filled++ : k - 1;
      for (; pos > 0 && best_key[pos - 1] < key; --pos) {
        best_key[pos] = best_key[pos - 1];
        best_id[pos] = best_id[pos - 1];
      }
      best_key[pos] = key;
      best_id[pos] = j;
    }
  }
}

Tensor topk_lowest_index_cpu(const Tensor& values, int64_t k) {
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 2,
              "topk_lowest_index_cpu: values must be a CPU tensor [N, T]");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "topk_lowest_index_cpu: values must be float32 or float64");
  TORCH_CHECK(k >= 1 && k <= values.size(1), "topk_lowest_index_cpu: need 1 <= k <= T, got k=", k,
              ", T=", values.size(1));
  const Tensor vc = values.contiguous();
  const int64_t n_rows = vc.size(0), n_cols = vc.size(1);
  Tensor indices = at::empty({n_rows, k}, vc.options().dtype(at::kLong));
  int64_t* out = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "topk_lowest_index_cpu", [&] {
    const scalar_t* v = vc.data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      select_rows<scalar_t>(v, n_cols, k, begin, end, out);
    });
  });
  return indices;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(molt_kernels, m) {
  m.def("topk_lowest_index_cpu(Tensor values, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(molt_kernels, CPU, m) {
  m.impl("topk_lowest_index_cpu", &topk_lowest_index_cpu);
}
