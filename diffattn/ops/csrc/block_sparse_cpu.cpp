// Block-sparse flash attention forward for CPU (fp32): every query block reads its kept key runs in
// place, so nothing is gathered, and runs one online softmax over them.
//
// Why a kernel of our own: torch's fused CPU kernel tiles a call's queries in splits of 32 below 192
// queries, so a 128-query block pays ~1.2-1.4x per score of a long dense call, and key blocks that are
// not one contiguous run must be gathered (a copy that costs about as much as the attention). Here a
// query block is one 128-row GEMM against each run of up to KV_SPLIT keys, wherever the run lies.
//
// Layout: q is (rows, block, dim), k and v are (tokens, dim), all contiguous. Row r's key runs are
// runs[row_ptr[r] .. row_ptr[r + 1]), each a [start, end) token range of k and v. Returns the output
// (rows, block, dim) and the log-sum-exp (rows, block); a row without runs gets zeros and -inf.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// MKL's Fortran BLAS, which libtorch_cpu exports (torch's own cpublas wrapper is not exported); inside
// the parallel region it runs single-threaded, as it does for torch's fused kernel.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;

// Column-major C (m x n) = op(A) op(B) + beta C, as BLAS sees it.
void gemm(bool trans_a, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
          float beta, float* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = 'N';
  const int mi = m, ni = n, ki = k, ldai = lda, ldbi = ldb, ldci = ldc;
  const float one = 1.f;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &ldai, b, &ldbi, &beta, c, &ldci);
}

// Keys per score tile: the tile (block x KV_SPLIT fp32, 256 KB at 128 queries) stays in L2.
constexpr int64_t KV_SPLIT = 512;

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& row_ptr, const at::Tensor& runs, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 2 && v.dim() == 2, "q must be (rows, block, dim), k and v (tokens, dim)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "the native kernel takes fp32");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == q.size(2), "k and v must be (tokens, dim) of q's dim");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && runs.scalar_type() == at::kLong, "row_ptr and runs are int64");
  TORCH_CHECK(row_ptr.numel() == q.size(0) + 1 && runs.dim() == 2 && runs.size(1) == 2, "row_ptr / runs shape");

  const int64_t rows = q.size(0), bs = q.size(1), dim = q.size(2), tokens = k.size(0);
  const float sc = static_cast<float>(scale);
  auto out = at::empty_like(q);
  auto lse = at::empty({rows, bs}, q.options());
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  float* od = out.data_ptr<float>();
  float* ld = lse.data_ptr<float>();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* rn = runs.data_ptr<int64_t>();
  for (int64_t j = 0; j < runs.size(0); ++j) {
    TORCH_CHECK(0 <= rn[2 * j] && rn[2 * j] < rn[2 * j + 1] && rn[2 * j + 1] <= tokens, "run ", j, " out of range");
  }

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(bs * KV_SPLIT), row_max(bs), row_sum(bs);
    for (int64_t r = begin; r < end; ++r) {
      const float* qr = qd + r * bs * dim;
      float* acc = od + r * bs * dim;  // the output block accumulates in place
      float* lr = ld + r * bs;
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      bool first = true;
      for (int64_t j = rp[r]; j < rp[r + 1]; ++j) {
        for (int64_t c = rn[2 * j]; c < rn[2 * j + 1]; c += KV_SPLIT) {
          const int64_t n = std::min(KV_SPLIT, rn[2 * j + 1] - c);
          // score (bs x n, row-major) = q_r k_c^T; column-major BLAS sees its transpose
          gemm(true, n, bs, dim, kd + c * dim, dim, qr, dim, 0.f, score.data(), n);
          for (int64_t i = 0; i < bs; ++i) {
            float* s = score.data() + i * n;
            const float tile_max = at::vec::reduce_all<float>(
                [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
            const float m_new = std::max(row_max[i], tile_max * sc);
            at::vec::map([sc, m_new](Vec x) { return (x * Vec(sc) - Vec(m_new)).exp_u20(); }, s, s, n);
            const float tile_sum = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s, n);
            const float alpha = first ? 0.f : std::exp(row_max[i] - m_new);
            row_sum[i] = row_sum[i] * alpha + tile_sum;
            row_max[i] = m_new;
            if (!first && alpha != 1.f) {
              float* a = acc + i * dim;
              at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, a, a, dim);
            }
          }
          // acc (bs x dim) (+)= p v_c
          gemm(false, dim, bs, n, vd + c * dim, dim, score.data(), n, first ? 0.f : 1.f, acc, dim);
          first = false;
        }
      }
      if (first) {  // no key at all
        std::fill(acc, acc + bs * dim, 0.f);
        std::fill(lr, lr + bs, -std::numeric_limits<float>::infinity());
        continue;
      }
      for (int64_t i = 0; i < bs; ++i) {
        const float inv = 1.f / row_sum[i];
        float* a = acc + i * dim;
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, a, a, dim);
        lr[i] = row_max[i] + std::log(row_sum[i]);
      }
    }
  });
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "block-sparse flash attention forward over in-place key runs (CPU, fp32)");
}
