// Fused elementwise parts of a decoder layer for CPU decoding, built with fp16_gemm.cpp into one
// library by flash/fp16_kernel.py.
//
// Why: in a one-token step of the default model each of these is a handful of tiny ATen ops
// (torch's CPU rms_norm alone is six), and on a 2-core VM every op costs ~5-15 us of dispatch, not
// arithmetic: 60 norms took ~5 ms of a ~35 ms step. Here each is one call. Both work row by row with
// the same code whatever the number of rows, so a row's result does not depend on which other rows
// share the call (a verification pass computes what one-token steps compute).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <tuple>

namespace {

// y = x * rsqrt(mean(x^2) + eps) * weight over the last dimension; x, weight fp32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "rms_norm: x must be a float32 CPU tensor");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == D, "rms_norm: weight must be float32 [D]");
  const at::Tensor rows = x.reshape({-1, D}).contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(rows);
  const float* xp = rows.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t M = rows.size(0), vec = D - D % 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * D;
    float* yr = yp + m * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < vec; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (int64_t i = vec; i < D; ++i) sum += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] * scale) * wp[i];
  }
  return y.view(x.sizes());
}

// Rotary embedding (rotate-half) of the q and k heads of a fused qkv projection, in one pass:
// qkv [B, n, (H + 2 Hkv) d] (the GEMM's output), cos/sin [B, n, d] -> q [B, H, n, d], k [B, Hkv, n, d].
// Each element is x * cos + rotate_half(x) * sin, two products and a sum each rounded to fp32 (the
// file is compiled without FMA contraction), exactly what flash.rope.apply_rope computes.
std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                           int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 3 && qkv.device().is_cpu(),
              "rope_qk: qkv must be a float32 CPU tensor [B, n, F]");
  const int64_t B = qkv.size(0), n = qkv.size(1), total = heads + 2 * kv_heads;
  TORCH_CHECK(qkv.size(2) % total == 0, "rope_qk: qkv's width is not a whole number of heads");
  const int64_t d = qkv.size(2) / total, half = d / 2;
  TORCH_CHECK(d % 2 == 0 && cos.sizes() == at::IntArrayRef({B, n, d}) && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope_qk: cos/sin must be float32 [B, n, head_dim] with an even head_dim");
  const at::Tensor src = qkv.contiguous(), c = cos.contiguous(), s = sin.contiguous();
  at::Tensor q = at::empty({B, heads, n, d}, qkv.options());
  at::Tensor k = at::empty({B, kv_heads, n, d}, qkv.options());
  const float* xp = src.const_data_ptr<float>();
  const float* cp = c.const_data_ptr<float>();
  const float* sp = s.const_data_ptr<float>();
  float* qp = q.mutable_data_ptr<float>();
  float* kp = k.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < n; ++t) {
      const float* row = xp + (b * n + t) * total * d;
      const float* cr = cp + (b * n + t) * d;
      const float* sr = sp + (b * n + t) * d;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        const float* x = row + h * d;
        float* out = h < heads ? qp + ((b * heads + h) * n + t) * d : kp + ((b * kv_heads + h - heads) * n + t) * d;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i] * cr[i], r = (-x[i + half]) * sr[i];
          out[i] = a + r;
        }
        for (int64_t i = half; i < d; ++i) {
          const float a = x[i] * cr[i], r = x[i - half] * sr[i];
          out[i] = a + r;
        }
      }
    }
  }
  return {q, k};
}

}  // namespace

TORCH_LIBRARY(flash_ops, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_qk(Tensor qkv, Tensor cos, Tensor sin, int heads, int kv_heads) -> (Tensor, Tensor)");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("rope_qk", c10::DispatchKey::CPU, TORCH_FN(rope_qk));
}
