// Fused elementwise parts of a decoder layer for CPU decoding, built with fp16_gemm.cpp into one
// library by flash/cpu/cpu_kernels.py.
//
// Why: in a one-token step of the default model each of these is a handful of tiny ATen ops
// (torch's CPU rms_norm alone is six), and on a 2-core VM every op costs ~5-15 us of dispatch, not
// arithmetic: 60 norms took ~5 ms of a ~35 ms step. Here each is one call. Both work row by row with
// the same code whatever the number of rows, so a row's result does not depend on which other rows
// share the call (a verification pass computes what one-token steps compute).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

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
// file is compiled without FMA contraction), exactly what flash.cpu.rope.apply_rope computes.
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

// exp(x) for 8 floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp), 0 below
// -87.3 (a masked score, -inf, gives exactly 0).
inline __m256 exp8(__m256 x) {
  const __m256 dead = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(y, x), x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(dead, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

// The dot products of one query row with 8 keys (key i at kb + i * k_pos), each summed in one fixed
// order (lane l + lane l + 4, then (0 + 2) + (1 + 3): what one key at a time did before), so a score
// is the same float whichever 8 keys share the call. Eight independent accumulators, and one shuffle
// tree for the 8 sums instead of a horizontal sum per key (scripts/kernel_ab.py times the change).
template <int LANES>
inline __m256 dots8(const float* qr, const float* kb, int64_t k_pos) {
  __m256 a[8];
  const __m256 q0 = _mm256_loadu_ps(qr);
  for (int i = 0; i < 8; ++i) a[i] = _mm256_mul_ps(q0, _mm256_loadu_ps(kb + i * k_pos));
  for (int c = 1; c < LANES; ++c) {
    const __m256 qc = _mm256_loadu_ps(qr + 8 * c);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kb + i * k_pos + 8 * c), a[i]);
  }
  __m256 s[4];  // s[i]: key 2i's four lane-pair sums | key 2i + 1's
  for (int i = 0; i < 4; ++i)
    s[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
  // (0 + 2, 1 + 3) of keys 0, 2 | 1, 3 and of keys 4, 6 | 5, 7; then their pair sums, put back in order.
  const __m256 t0 = _mm256_add_ps(_mm256_shuffle_ps(s[0], s[1], 0x44), _mm256_shuffle_ps(s[0], s[1], 0xEE));
  const __m256 t1 = _mm256_add_ps(_mm256_shuffle_ps(s[2], s[3], 0x44), _mm256_shuffle_ps(s[2], s[3], 0xEE));
  return _mm256_permutevar8x32_ps(_mm256_hadd_ps(t0, t1), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Keys are prefetched this many positions (8 KB at head_dim 64) ahead, values one 64-key block ahead:
// in a real pass the cache comes from DRAM (30 layers' keys and values do not stay cached between
// steps), as the GEMM's weights do. The default model's 1- and 5-token passes after a video prompt:
// 0.95x / 0.96x the time (python scripts/kernel_ab.py HEAD, against the build without these lines).
constexpr int64_t kPrefetchKeys = 32;

// Attention of rows [r0, r1) of one KV head's group: row r is query r % n of query head r / n of the
// group (LANES = head_dim / 8, a compile-time constant so the accumulators stay in registers).
// Each block of 8 keys is loaded once for all the rows (the group shares it); scores: (r1 - r0) * stride
// floats, sums: (r1 - r0) * (head_dim + 1).
template <int LANES>
void attend_rows(const float* q, const float* kh, int64_t k_pos, const float* vh, int64_t v_pos, const float* mask,
                 int64_t n, int64_t L, int64_t r0, int64_t r1, float scale, float* out, int64_t out_head,
                 int64_t out_query, float* scores, int64_t stride, float* sums) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 neg_inf = _mm256_set1_ps(kNegInf), scale8 = _mm256_set1_ps(scale);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  float tail[8 * LANES * 8] = {};  // the last, partial block of keys, zero-padded
  for (int64_t j = 0; j < L; j += 8) {
    const float* kb = kh + j * k_pos;
    int64_t kb_pos = k_pos;
    if (j + kPrefetchKeys + 8 <= L)
      for (int t = 0; t < 8; ++t)
        for (int c = 0; c < LANES * 8; c += 16)
          _mm_prefetch(reinterpret_cast<const char*>(kb + (kPrefetchKeys + t) * k_pos + c), _MM_HINT_T0);
    if (j + 8 > L) {
      for (int64_t t = j; t < L; ++t)
        std::copy(kh + t * k_pos, kh + t * k_pos + LANES * 8, tail + (t - j) * LANES * 8);
      kb = tail;
      kb_pos = LANES * 8;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % n;
      __m256 score = _mm256_mul_ps(dots8<LANES>(q + r * LANES * 8, kb, kb_pos), scale8);
      __m256 hidden;  // a masked key scores exactly -inf
      if (mask) {
        const float* mrow = mask + i * L + j;
        float mask_tail[8] = {};
        if (j + 8 > L) {  // a full-width load would run past the row
          std::copy(mrow, mask + (i + 1) * L, mask_tail);
          mrow = mask_tail;
        }
        const __m256 m = _mm256_loadu_ps(mrow);
        score = _mm256_add_ps(score, m);
        hidden = _mm256_cmp_ps(m, neg_inf, _CMP_EQ_OQ);
      } else {  // causal, the queries last: key j is hidden from query i when j > L - n + i
        hidden = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
            _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(j))),
            _mm256_set1_epi32(static_cast<int>(L - n + i))));
      }
      _mm256_storeu_ps(scores + (r - r0) * stride + j, _mm256_blendv_ps(score, neg_inf, hidden));
    }
  }
  for (int64_t r = r0; r < r1; ++r) {  // each row's weights: exp(score - the row's max)
    float* row = scores + (r - r0) * stride;
    for (int64_t j = L; j < stride; ++j) row[j] = kNegInf;
    __m256 best8 = _mm256_set1_ps(kNegInf);
    for (int64_t j = 0; j < stride; j += 8) best8 = _mm256_max_ps(best8, _mm256_loadu_ps(row + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, best8);
    const float best = *std::max_element(lanes, lanes + 8);
    if (best == kNegInf) {  // every key masked: all weights zero, and the row attends to nothing
      std::fill(row, row + stride, 0.0f);
      continue;
    }
    const __m256 shift = _mm256_set1_ps(best);
    for (int64_t j = 0; j < stride; j += 8)
      _mm256_storeu_ps(row + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift)));
  }
  // The weights' sum and the weighted values run over the visible keys in cache order, skipping the
  // masked ones: a tree row sums exactly what the one-token step on its path sums, although the
  // tree's nodes sit at other cache slots than that path's tokens. The keys go in blocks small enough
  // for their values to stay in L1 while every row takes them (sums: the rows' running sums between
  // blocks); one row at a time over all the keys re-read the values from L2/L3 for each row.
  constexpr int64_t kBlock = 64;
  std::fill(sums, sums + (r1 - r0) * (LANES * 8 + 1), 0.0f);
  for (int64_t j0 = 0; j0 < L; j0 += kBlock) {
    const int64_t j1 = std::min(L, j0 + kBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = scores + (r - r0) * stride;
      float* sum = sums + (r - r0) * (LANES * 8 + 1);  // LANES * 8 weighted values, then the weights' total
      __m256 acc[LANES];
      for (int c = 0; c < LANES; ++c) acc[c] = _mm256_loadu_ps(sum + 8 * c);
      float total = sum[LANES * 8];
      for (int64_t j = j0; j < j1; ++j) {
        if (r == r0 && j + kBlock < L)
          for (int c = 0; c < LANES * 8; c += 16)
            _mm_prefetch(reinterpret_cast<const char*>(vh + (j + kBlock) * v_pos + c), _MM_HINT_T0);
        if (row[j] == 0.0f) continue;
        total += row[j];
        const __m256 p = _mm256_set1_ps(row[j]);
        const float* vj = vh + j * v_pos;
        for (int c = 0; c < LANES; ++c) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * c), acc[c]);
      }
      for (int c = 0; c < LANES; ++c) _mm256_storeu_ps(sum + 8 * c, acc[c]);
      sum[LANES * 8] = total;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* sum = sums + (r - r0) * (LANES * 8 + 1);
    float* out_row = out + (r / n) * out_head + (r % n) * out_query;
    const float total = sum[LANES * 8];
    if (total == 0.0f) {  // no visible key
      std::fill(out_row, out_row + LANES * 8, 0.0f);
      continue;
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (int c = 0; c < LANES; ++c)
      _mm256_storeu_ps(out_row + 8 * c, _mm256_mul_ps(_mm256_loadu_ps(sum + 8 * c), inv));
  }
}

// Attention for decoding (one sequence, a few queries over a KV cache), grouped KV heads kept grouped:
// q [1, H, n, d] (d = 64 or 128); k, v [1, Hkv, L, d] with unit stride over d (views of the cache);
// mask additive [n, L] (a draft tree), or none: causal, query i at position L - n + i.
// Returns [1, n, H, d]. Each query is computed on its own, in one fixed order over the keys (an exact
// max, then exp, sum and the weighted values): its result does not depend on the other queries in
// the call, and a masked key adds exact zeros, so a tree row equals the one-token step on its path.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  q.device().is_cpu(), "decode_attention: float32 CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1,
              "decode_attention: one sequence, [1, heads, positions, head_dim]");
  const int64_t H = q.size(1), n = q.size(2), d = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK((d == 64 || d == 128) && k.size(3) == d && v.size(3) == d && v.size(1) == Hkv && v.size(2) == L &&
                  Hkv > 0 && H % Hkv == 0 && L >= n && n > 0 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: shapes do not match (head_dim 64 or 128)");
  const at::Tensor qc = q.contiguous();
  at::Tensor m;
  if (mask.has_value()) {
    m = mask->reshape({-1, mask->size(-2), mask->size(-1)});
    TORCH_CHECK(m.size(0) == 1 && m.size(1) == n && m.size(2) == L && m.scalar_type() == at::kFloat,
                "decode_attention: mask must be additive float32 [n, L]");
    m = m.contiguous();
  }
  at::Tensor out = at::empty({1, n, H, d}, q.options());
  const float* qp = qc.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  const float* mp = m.defined() ? m.const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  // Work items: each KV head's rows (its query heads x the queries) in two halves, so two threads
  // share three KV heads evenly; each item reads its head's keys and values once for all its rows.
  const int64_t group = H / Hkv, rows = group * n, half = (rows + 1) / 2, stride = (L + 7) / 8 * 8;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, 2 * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(half * stride), sums(half * (d + 1));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / 2, r0 = (item % 2) * half, r1 = std::min(rows, r0 + half);
      if (r0 >= r1) continue;
      const float* qg = qp + g * group * n * d;
      const float* kh = kp + g * k.stride(1);
      const float* vh = vp + g * v.stride(1);
      float* og = op + g * group * d;
      if (d == 64)
        attend_rows<8>(qg, kh, k.stride(2), vh, v.stride(2), mp, n, L, r0, r1, fscale, og, d, H * d, scores.data(),
                       stride, sums.data());
      else
        attend_rows<16>(qg, kh, k.stride(2), vh, v.stride(2), mp, n, L, r0, r1, fscale, og, d, H * d, scores.data(),
                        stride, sums.data());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(flash_ops, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_qk(Tensor qkv, Tensor cos, Tensor sin, int heads, int kv_heads) -> (Tensor, Tensor)");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("rope_qk", c10::DispatchKey::CPU, TORCH_FN(rope_qk));
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
