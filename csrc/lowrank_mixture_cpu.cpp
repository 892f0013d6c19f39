// The CPU MOLT decode as two torch ops, molt_kernels::lowrank_mixture_cpu and its backward.
//
// Why a C++ kernel: the PyTorch path issues hundreds of small multi-threaded ATen ops per step,
// and on a busy machine each one waits at an OpenMP barrier for a descheduled thread. Here every
// phase is ONE parallel region whose threads pull work units from a shared counter (a descheduled
// thread delays only the unit it holds) and run each unit as single-threaded BLAS GEMMs on
// gathered rows.
//
// Layout (compact, no padding): rows are the kept (token, slot) pairs grouped by transform, in
// transform id order, and within a transform in flat pair order (token-major). row_pair[row] is
// the pair id (token * n_slots + slot); t_offsets[t] .. t_offsets[t + 1] are transform t's rows.
// h_pre (the ungated rank-space activations x V_t^T, saved for the backward) is one flat buffer:
// transform t's rows hold r_t values each, starting at h_offset(t) = sum_{t' < t} count_t' r_t'.
//
// Determinism: work units are fixed by the shapes and the routing (never by the thread count);
// each unit is computed by one thread in a fixed order, and every output element is written by
// exactly one unit. So results are bitwise identical across runs and thread counts.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// Rows per unit of the per-transform phases: bounds the gathered buffers (kRowChunk x d per
// thread) and keeps dU / dV reductions in a fixed chunk order.
constexpr int64_t kRowChunk = 512;
// Target rows per (token tile, transform) GEMM of the per-tile phases; tiles are also capped so
// that there are at least kMinTiles of them to balance.
constexpr int64_t kTileRows = 256;
constexpr int64_t kMinTiles = 4;

// Fortran BLAS of the BLAS torch links (MKL in the x86 wheels: libtorch_cpu exports sgemm_ and
// dgemm_, while at::native::cpublas::gemm is not exported). Weak, so that a torch without them
// still loads this library and takes at::mm_out instead.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (returns the previous one; 0 means "the global setting").
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // the C entry point
}

// Makes BLAS calls on this thread single-threaded while alive. MKL would otherwise start its own
// threads inside our parallel region: on a busy machine that oversubscription made a step ~10x
// slower. Thread-local, so nothing outside this library changes.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

template <typename scalar_t>
using blas_gemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                             const scalar_t*, const scalar_t*, const int*, const scalar_t*,
                             const int*, const scalar_t*, scalar_t*, const int*);

template <typename scalar_t>
blas_gemm_t<scalar_t> blas_gemm() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return sgemm_;
  } else {
    return dgemm_;
  }
}

// Row-major C[m, n] = op(A) op(B) + beta C: A is [m, k] (ta: stored [k, m]), B is [k, n] (tb:
// stored [n, k]); beta is 0 or 1. BLAS is column-major, so compute C^T = op(B)^T op(A)^T.
// Called inside a parallel region, so BLAS runs single-threaded.
template <typename scalar_t>
void matmul(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
            const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (auto gemm = blas_gemm<scalar_t>()) {
    const int M = m, N = n, K = k, LDA = lda, LDB = ldb, LDC = ldc;
    const scalar_t one = 1;
    gemm(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
    return;
  }
  const auto opts = at::TensorOptions(c10::CppTypeToScalarType<scalar_t>());
  auto view = [&](const scalar_t* data, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    const Tensor t = at::from_blob(const_cast<scalar_t*>(data), {rows, cols}, {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  const Tensor prod = at::mm(view(a, ta ? k : m, ta ? m : k, lda, ta),
                             view(b, tb ? n : k, tb ? k : n, ldb, tb));
  if (beta == scalar_t(0)) {
    out.copy_(prod);
  } else {
    out.add_(prod);
  }
}

// Runs unit(worker_buffers, u) for u in [0, n_units) in one parallel region; threads take the
// next unit from a shared counter, so a thread that the OS deschedules holds up only its unit.
// make_buffers() runs once per thread (scratch space reused across that thread's units).
template <typename MakeBuffers, typename Unit>
void for_each_unit(int64_t n_units, MakeBuffers make_buffers, Unit unit) {
  if (n_units == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_units);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    const SingleThreadedBlas single_threaded;
    auto buffers = make_buffers();
    for (int64_t u = next.fetch_add(1); u < n_units; u = next.fetch_add(1)) unit(buffers, u);
  });
}

// The threads one parallel region of this library runs on, at torch's intra-op thread count: the
// guard for the OpenMP build (compiled without it, at::parallel_for is a serial loop).
int64_t parallel_region_threads() {
  std::atomic<int64_t> threads{0};
  for_each_unit(at::get_num_threads(), [&] { return threads.fetch_add(1); },
                [](int64_t, int64_t) {});
  return threads.load();
}

// The transforms' weights as flat per-transform pointers, and the routing as host arrays.
template <typename scalar_t>
struct Problem {
  int64_t n_tokens, n_slots, d_in, d_out, n_transforms;
  std::vector<const scalar_t*> U, V;  // U_t [d_out, r_t], V_t [r_t, d_in], row-major
  std::vector<int64_t> rank;          // r_t
  const int64_t* row_pair;            // [n_pairs]
  const int64_t* t_offsets;           // [T + 1]
  std::vector<int64_t> h_offset;      // [T + 1], in elements of h_pre

  int64_t rows(int64_t t) const { return t_offsets[t + 1] - t_offsets[t]; }

  // Rows per chunk of transform t: at most kRowChunk, and equal chunks (557 rows -> 279 + 278,
  // not 512 + 45: a sliver of rows is a GEMM far below BLAS speed).
  int64_t chunk_rows(int64_t t) const {
    const int64_t n_chunks = std::max<int64_t>(1, (rows(t) + kRowChunk - 1) / kRowChunk);
    return (rows(t) + n_chunks - 1) / n_chunks;
  }
  int64_t token(int64_t row) const { return row_pair[row] / n_slots; }

  // Tokens per tile: about kTileRows rows of an average transform, at least kMinTiles tiles.
  int64_t tile_tokens() const {
    const int64_t per_row = std::max<int64_t>(1, n_slots);
    const int64_t by_rows = (kTileRows * std::max<int64_t>(n_transforms, 1) + per_row - 1) / per_row;
    const int64_t by_count = (n_tokens + kMinTiles - 1) / kMinTiles;
    return std::max<int64_t>(1, std::min(by_rows, by_count));
  }

  // Transform t's rows whose token lies in [tok0, tok1): contiguous, since rows are token-major.
  std::pair<int64_t, int64_t> rows_in_tile(int64_t t, int64_t tok0, int64_t tok1) const {
    const int64_t* first = row_pair + t_offsets[t];
    const int64_t* last = row_pair + t_offsets[t + 1];
    const int64_t* lo = std::lower_bound(first, last, tok0 * n_slots);
    const int64_t* hi = std::lower_bound(lo, last, tok1 * n_slots);
    return {lo - row_pair, hi - row_pair};
  }
};

std::vector<Tensor> contiguous_all(at::TensorList ts) {
  std::vector<Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const Tensor& x, const Tensor& gates, const std::vector<Tensor>& U,
                               const std::vector<Tensor>& V, const Tensor& row_pair,
                               const Tensor& t_offsets) {
  Problem<scalar_t> p;
  p.n_tokens = x.size(0);
  p.d_in = x.size(1);
  p.n_slots = gates.size(1);
  p.d_out = U.empty() ? 0 : U[0].size(1);
  for (size_t b = 0; b < V.size(); ++b) {
    const int64_t n = V[b].size(0), r = V[b].size(1);
    for (int64_t j = 0; j < n; ++j) {
      p.U.push_back(U[b].data_ptr<scalar_t>() + j * p.d_out * r);
      p.V.push_back(V[b].data_ptr<scalar_t>() + j * r * p.d_in);
      p.rank.push_back(r);
    }
  }
  p.n_transforms = static_cast<int64_t>(p.rank.size());
  p.row_pair = row_pair.data_ptr<int64_t>();
  p.t_offsets = t_offsets.data_ptr<int64_t>();
  p.h_offset.assign(p.n_transforms + 1, 0);
  for (int64_t t = 0; t < p.n_transforms; ++t)
    p.h_offset[t + 1] = p.h_offset[t] + p.rows(t) * p.rank[t];
  return p;
}

void check_inputs(const char* op, const Tensor& x, const Tensor& gates, at::TensorList U,
                  at::TensorList V) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, op, ": x must be a CPU tensor [N, d_in]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64");
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == x.size(0) &&
                  gates.scalar_type() == x.scalar_type(),
              op, ": gates must be [N, k] in x's dtype");
  TORCH_CHECK(U.size() == V.size() && !U.empty(), op, ": one U and one V per bucket");
  for (size_t b = 0; b < U.size(); ++b) {
    TORCH_CHECK(V[b].dim() == 3 && U[b].dim() == 3 && V[b].size(0) == U[b].size(0) &&
                    V[b].size(1) == U[b].size(2) && V[b].size(2) == x.size(1) &&
                    U[b].size(1) == U[0].size(1),
                op, ": bucket ", b, " needs U [n, d_out, r] and V [n, r, d_in]");
    TORCH_CHECK(U[b].scalar_type() == x.scalar_type() && V[b].scalar_type() == x.scalar_type() &&
                    U[b].device().is_cpu() && V[b].device().is_cpu(),
                op, ": U and V must be CPU tensors in x's dtype");
  }
}

// Counting sort of the kept pairs by transform (stable: pair order within a transform).
template <typename scalar_t>
std::tuple<Tensor, Tensor> route(const Tensor& indices, const Tensor& gates, int64_t n_transforms) {
  const int64_t n_pairs = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const scalar_t* g = gates.data_ptr<scalar_t>();
  Tensor t_offsets = at::zeros({n_transforms + 1}, indices.options());
  Tensor row_pair = at::empty({n_pairs}, indices.options());
  int64_t* off = t_offsets.data_ptr<int64_t>();
  for (int64_t p = 0; p < n_pairs; ++p) {
    if (g[p] == scalar_t(0)) continue;
    TORCH_CHECK(idx[p] >= 0 && idx[p] < n_transforms, "lowrank_mixture_cpu: index ", idx[p],
                " out of range [0, ", n_transforms, ")");
    ++off[idx[p] + 1];
  }
  for (int64_t t = 0; t < n_transforms; ++t) off[t + 1] += off[t];
  std::vector<int64_t> cursor(off, off + n_transforms);
  int64_t* rp = row_pair.data_ptr<int64_t>();
  for (int64_t p = 0; p < n_pairs; ++p)
    if (g[p] != scalar_t(0)) rp[cursor[idx[p]]++] = p;
  std::fill(rp + off[n_transforms], rp + n_pairs, int64_t(-1));
  return {row_pair, t_offsets};
}

// Copies rows src[index(i)] (width d) into dst [m, d].
template <typename scalar_t, typename Index>
void gather_rows(scalar_t* dst, const scalar_t* src, int64_t m, int64_t d, Index index) {
  for (int64_t i = 0; i < m; ++i) std::copy_n(src + index(i) * d, d, dst + i * d);
}

struct Scratch {
  std::vector<Tensor> keep;  // owns the memory
  template <typename scalar_t>
  scalar_t* take(int64_t n) {
    keep.push_back(at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions(
                                                          c10::CppTypeToScalarType<scalar_t>())));
    return keep.back().data_ptr<scalar_t>();
  }
};

// Per-transform phase of the forward, in row chunks (chunk_rows): h_pre rows = X_rows V_t^T.
template <typename scalar_t>
void forward_shrink(const Problem<scalar_t>& p, const scalar_t* x, scalar_t* h_pre) {
  RECORD_FUNCTION("lowrank_mixture_cpu::shrink", std::vector<c10::IValue>());
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (transform, first row)
  for (int64_t t = 0; t < p.n_transforms; ++t)
    for (int64_t row0 = p.t_offsets[t]; row0 < p.t_offsets[t + 1]; row0 += p.chunk_rows(t))
      chunks.emplace_back(t, row0);
  for_each_unit(
      static_cast<int64_t>(chunks.size()),
      [&] {
        Scratch s;
        s.take<scalar_t>(kRowChunk * p.d_in);
        return s;
      },
      [&](Scratch& s, int64_t u) {
        const auto [t, row0] = chunks[u];
        const int64_t m = std::min(p.chunk_rows(t), p.t_offsets[t + 1] - row0), r = p.rank[t];
        scalar_t* xs = s.keep[0].data_ptr<scalar_t>();
        gather_rows(xs, x, m, p.d_in, [&](int64_t i) { return p.token(row0 + i); });
        scalar_t* h = h_pre + p.h_offset[t] + (row0 - p.t_offsets[t]) * r;
        matmul<scalar_t>(false, true, m, r, p.d_in, xs, p.d_in, p.V[t], p.d_in, 0, h, r);
      });
}

// Per token tile: out[token] = init + sum over the token's rows, in transform order, of
// scale_row * (rank_row W_t), where rank rows have the h_pre layout, scale is the row's gate (or
// 1 when gates is null) and W_t is [r_t, width] (w_transposed: stored [width, r_t]). The scale is
// applied while adding the product into out, which reads it anyway.
template <typename scalar_t>
void expand_to_tokens(const Problem<scalar_t>& p, const scalar_t* rank_rows, const scalar_t* gates,
                      const std::vector<const scalar_t*>& W, bool w_transposed, int64_t width,
                      const scalar_t* init, scalar_t* out) {
  RECORD_FUNCTION("lowrank_mixture_cpu::expand", std::vector<c10::IValue>());
  const int64_t tile = p.tile_tokens();
  const int64_t n_tiles = (p.n_tokens + tile - 1) / tile;
  const int64_t max_rows = tile * p.n_slots;
  for_each_unit(
      n_tiles,
      [&] {
        Scratch s;
        s.take<scalar_t>(max_rows * width);
        return s;
      },
      [&](Scratch& s, int64_t u) {
        scalar_t* prod = s.keep[0].data_ptr<scalar_t>();
        const int64_t tok0 = u * tile, tok1 = std::min(p.n_tokens, tok0 + tile);
        for (int64_t n = tok0; n < tok1; ++n) {
          if (init != nullptr) {
            std::copy_n(init, width, out + n * width);
          } else {
            std::fill_n(out + n * width, width, scalar_t(0));
          }
        }
        for (int64_t t = 0; t < p.n_transforms; ++t) {
          const auto [row0, row1] = p.rows_in_tile(t, tok0, tok1);
          const int64_t m = row1 - row0, r = p.rank[t];
          if (m == 0) continue;
          const scalar_t* a = rank_rows + p.h_offset[t] + (row0 - p.t_offsets[t]) * r;
          matmul<scalar_t>(false, w_transposed, m, width, r, a, r, W[t], w_transposed ? r : width,
                           0, prod, width);
          for (int64_t i = 0; i < m; ++i) {
            scalar_t* dst = out + p.token(row0 + i) * width;
            const scalar_t* src = prod + i * width;
            if (gates != nullptr) {
              const scalar_t g = gates[p.row_pair[row0 + i]];
              for (int64_t j = 0; j < width; ++j) dst[j] += g * src[j];
            } else {
              for (int64_t j = 0; j < width; ++j) dst[j] += src[j];
            }
          }
        }
      });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lowrank_mixture_cpu(const Tensor& x,
                                                               const Tensor& gates,
                                                               const Tensor& indices,
                                                               at::TensorList U, at::TensorList V,
                                                               const Tensor& b_dec) {
  check_inputs("lowrank_mixture_cpu", x, gates, U, V);
  TORCH_CHECK(indices.sizes() == gates.sizes() && indices.scalar_type() == at::kLong,
              "lowrank_mixture_cpu: indices must be int64 shaped like gates");
  const Tensor xc = x.contiguous(), gc = gates.contiguous(), bc = b_dec.contiguous();
  const auto Uc = contiguous_all(U), Vc = contiguous_all(V);
  TORCH_CHECK(bc.numel() == Uc[0].size(1), "lowrank_mixture_cpu: b_dec must be [d_out]");
  int64_t n_transforms = 0;
  for (const auto& v : Vc) n_transforms += v.size(0);
  Tensor y = at::empty({x.size(0), Uc[0].size(1)}, x.options());
  Tensor row_pair, t_offsets, h_pre;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lowrank_mixture_cpu", [&] {
    std::tie(row_pair, t_offsets) = route<scalar_t>(indices.contiguous(), gc, n_transforms);
    const auto p = make_problem<scalar_t>(xc, gc, Uc, Vc, row_pair, t_offsets);
    h_pre = at::empty({p.h_offset.back()}, x.options());
    forward_shrink<scalar_t>(p, xc.data_ptr<scalar_t>(), h_pre.data_ptr<scalar_t>());
    expand_to_tokens<scalar_t>(p, h_pre.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), p.U,
                               /*w_transposed=*/true, p.d_out, bc.data_ptr<scalar_t>(),
                               y.data_ptr<scalar_t>());
  });
  return {y, row_pair, t_offsets, h_pre};
}

// Per-transform phase of the backward, in row chunks (chunk_rows; dU_t and dV_t accumulate over
// the chunks in order): dH = dY U_t; dgate = rowsum(dH * h_pre); dU_t = dY^T (g h_pre);
// dH_pre = g dH (kept for dx); dV_t = dH_pre^T X.
template <typename scalar_t>
void backward_transforms(const Problem<scalar_t>& p, const scalar_t* grad_y, const scalar_t* x,
                         const scalar_t* gates, const scalar_t* h_pre, scalar_t* dh_pre,
                         scalar_t* dgates, const std::vector<scalar_t*>& dU,
                         const std::vector<scalar_t*>& dV) {
  RECORD_FUNCTION("lowrank_mixture_cpu::backward_transforms", std::vector<c10::IValue>());
  const int64_t max_rank = *std::max_element(p.rank.begin(), p.rank.end());
  const int64_t width = std::max(p.d_in, p.d_out);
  // Largest transforms first, so the last units to run are small ones.
  std::vector<int64_t> order(p.n_transforms);
  for (int64_t t = 0; t < p.n_transforms; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return p.rows(a) * p.rank[a] > p.rows(b) * p.rank[b];
  });
  struct Buffers {
    Scratch s;
    scalar_t *rows, *dh, *hg;
  };
  for_each_unit(
      p.n_transforms,
      [&] {
        Buffers b;
        b.rows = b.s.template take<scalar_t>(kRowChunk * width);
        b.dh = b.s.template take<scalar_t>(kRowChunk * max_rank);
        b.hg = b.s.template take<scalar_t>(kRowChunk * max_rank);
        return b;
      },
      [&](Buffers& b, int64_t u) {
        const int64_t t = order[u], r = p.rank[t];
        if (p.rows(t) == 0) {
          if (!dU.empty()) std::fill_n(dU[t], p.d_out * r, scalar_t(0));
          if (!dV.empty()) std::fill_n(dV[t], r * p.d_in, scalar_t(0));
          return;
        }
        const int64_t chunk = p.chunk_rows(t);
        for (int64_t row0 = p.t_offsets[t]; row0 < p.t_offsets[t + 1]; row0 += chunk) {
          const int64_t m = std::min(chunk, p.t_offsets[t + 1] - row0);
          const scalar_t beta = row0 == p.t_offsets[t] ? scalar_t(0) : scalar_t(1);
          const scalar_t* h = h_pre + p.h_offset[t] + (row0 - p.t_offsets[t]) * r;
          gather_rows(b.rows, grad_y, m, p.d_out, [&](int64_t i) { return p.token(row0 + i); });
          matmul<scalar_t>(false, false, m, r, p.d_out, b.rows, p.d_out, p.U[t], r, 0, b.dh, r);
          for (int64_t i = 0; i < m; ++i) {
            const int64_t pair = p.row_pair[row0 + i];
            const scalar_t g = gates[pair];
            scalar_t dot = 0;
            for (int64_t j = 0; j < r; ++j) {
              dot += b.dh[i * r + j] * h[i * r + j];
              b.hg[i * r + j] = g * h[i * r + j];
              b.dh[i * r + j] *= g;
            }
            if (dgates != nullptr) dgates[pair] = dot;
          }
          if (!dU.empty())
            matmul<scalar_t>(true, false, p.d_out, r, m, b.rows, p.d_out, b.hg, r, beta, dU[t], r);
          if (dh_pre != nullptr)
            std::copy_n(b.dh, m * r, dh_pre + p.h_offset[t] + (row0 - p.t_offsets[t]) * r);
          if (!dV.empty()) {
            gather_rows(b.rows, x, m, p.d_in, [&](int64_t i) { return p.token(row0 + i); });
            matmul<scalar_t>(true, false, r, p.d_in, m, b.dh, r, b.rows, p.d_in, beta, dV[t],
                             p.d_in);
          }
        }
      });
}

std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>> lowrank_mixture_cpu_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& gates, const Tensor& row_pair,
    const Tensor& t_offsets, at::TensorList U, at::TensorList V, const Tensor& h_pre,
    bool need_x, bool need_gates, bool need_U, bool need_V) {
  check_inputs("lowrank_mixture_cpu_backward", x, gates, U, V);
  const Tensor gy = grad_y.contiguous(), xc = x.contiguous(), gc = gates.contiguous();
  const auto Uc = contiguous_all(U), Vc = contiguous_all(V);
  TORCH_CHECK(gy.sizes() == at::IntArrayRef({x.size(0), Uc[0].size(1)}) &&
                  gy.scalar_type() == x.scalar_type(),
              "lowrank_mixture_cpu_backward: grad_y must be [N, d_out] in x's dtype");
  Tensor dx = need_x ? at::empty_like(xc) : x.new_empty({0});
  Tensor dgates = need_gates ? at::zeros_like(gc) : gates.new_empty({0});
  std::vector<Tensor> dU, dV;
  if (need_U)
    for (const auto& u : Uc) dU.push_back(at::empty_like(u));
  if (need_V)
    for (const auto& v : Vc) dV.push_back(at::empty_like(v));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lowrank_mixture_cpu_backward", [&] {
    const auto p = make_problem<scalar_t>(xc, gc, Uc, Vc, row_pair, t_offsets);
    TORCH_CHECK(h_pre.numel() == p.h_offset.back() && h_pre.is_contiguous(),
                "lowrank_mixture_cpu_backward: h_pre does not match the routing");
    // Flat per-transform pointers into the per-bucket gradients.
    std::vector<scalar_t*> dUt, dVt;
    for (size_t b = 0; b < Vc.size(); ++b) {
      const int64_t r = Vc[b].size(1);
      for (int64_t j = 0; j < Vc[b].size(0); ++j) {
        if (need_U) dUt.push_back(dU[b].data_ptr<scalar_t>() + j * p.d_out * r);
        if (need_V) dVt.push_back(dV[b].data_ptr<scalar_t>() + j * r * p.d_in);
      }
    }
    Tensor dh_pre = need_x ? at::empty_like(h_pre) : Tensor();
    if (need_gates || need_U || need_V || need_x)
      backward_transforms<scalar_t>(p, gy.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                    gc.data_ptr<scalar_t>(), h_pre.data_ptr<scalar_t>(),
                                    need_x ? dh_pre.data_ptr<scalar_t>() : nullptr,
                                    need_gates ? dgates.data_ptr<scalar_t>() : nullptr, dUt, dVt);
    if (need_x)
      expand_to_tokens<scalar_t>(p, dh_pre.data_ptr<scalar_t>(), nullptr, p.V,
                                 /*w_transposed=*/false, p.d_in, nullptr, dx.data_ptr<scalar_t>());
  });
  return {dx, dgates, dU, dV};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(molt_kernels, m) {
  m.def(
      "lowrank_mixture_cpu(Tensor x, Tensor gates, Tensor indices, Tensor[] U, Tensor[] V, "
      "Tensor b_dec) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lowrank_mixture_cpu_backward(Tensor grad_y, Tensor x, Tensor gates, Tensor row_pair, "
      "Tensor t_offsets, Tensor[] U, Tensor[] V, Tensor h_pre, bool need_x, bool need_gates, "
      "bool need_U, bool need_V) -> (Tensor, Tensor, Tensor[], Tensor[])");
  m.def("parallel_region_threads() -> int", &parallel_region_threads);
}

TORCH_LIBRARY_IMPL(molt_kernels, CPU, m) {
  m.impl("lowrank_mixture_cpu", &lowrank_mixture_cpu);
  m.impl("lowrank_mixture_cpu_backward", &lowrank_mixture_cpu_backward);
}
