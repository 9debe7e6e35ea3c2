// FLASH's fp16-weight GEMM for CPU decoding: y[M, N] = x[M, K] @ W[N, K]^T, x and y fp32, W fp16.
//
// Built once on first use by flash/cpu/cpu_kernels.py (AVX2 + FMA + F16C; an AVX-512 path chosen at run
// time where the CPU has it). Weights are packed as [N/16, K, 16] fp16: each 16-column block is one
// contiguous stream, read once per call and converted to fp32 in registers; up to six rows of x (12 on
// AVX-512) share each converted weight vector.
// Every output element is one fp32 FMA chain over k = 0..K-1, whatever M, the row chunking or the
// thread count, so a row's result does not depend on which other rows share the call: a draft
// verification computes exactly what one-token steps compute.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kCols = 16;  // output columns per packed block (two AVX2 registers)
constexpr int64_t kRows = 6;   // rows per chunk: 12 accumulators + 2 weights + 1 broadcast <= 16 registers
// Weights are prefetched this many k-steps (8 KB) ahead, one cache line per two steps. The stream
// comes from DRAM (a step's 269 MB of weights do not fit any cache); with several rows the FMAs keep
// the core busy and the hardware prefetcher alone fell behind. Measured on the default model's 121
// GEMMs in order (the streamed line of scripts/gemm_cost.py's kind of run; builds with and without
// these lines interleaved in one process, median of 12): 5 rows 30.2 -> 22.2 ms, 1 row 27.3 -> 22.9
// ms; 16-64 steps ahead gained little, 128-512 about the same as 256.
constexpr int64_t kPrefetchSteps = 256;
// Up to this many rows (decoding, verification) each 6-row chunk converts the fp16 weights it streams.
// More rows (a prefill) convert each block to fp32 once, for all the chunks, instead of once per chunk:
// a decoder layer's four GEMMs at a video prompt's 515 rows ~0.9x the time, an image's 97 rows about
// the same (python scripts/kernel_ab.py REV, against a revision before this).
constexpr int64_t kMaxStreamedRows = 12;

inline __m256 load8(const uint16_t* w) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }

// y[M, ncols] = x[M, K] @ one block's weights (w [K, 16], fp16 as packed, or already converted to fp32:
// the conversion is exact, so both give the same floats).
template <int M, typename W>
inline void block_kernel(const float* x, int64_t K, const W* w, float* y, int64_t ldy, int64_t ncols) {
  __m256 acc[M][2];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    acc[m][0] = _mm256_setzero_ps();
    acc[m][1] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    // Past the end of the weights this only hints at an address: prefetches never fault.
    if constexpr (std::is_same_v<W, uint16_t>)
      if ((k & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchSteps) * kCols), _MM_HINT_T0);
    const __m256 w0 = load8(w + k * kCols), w1 = load8(w + k * kCols + 8);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 a = _mm256_broadcast_ss(x + m * K + k);
      acc[m][0] = _mm256_fmadd_ps(a, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(a, w1, acc[m][1]);
    }
  }
  // Stored through a local buffer after the loop: indexing acc with a run-time column count would
  // make the compiler keep the accumulators in memory inside the loop (3x slower).
  float out[M][kCols];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(out[m], acc[m][0]);
    _mm256_storeu_ps(out[m] + 8, acc[m][1]);
  }
  for (int m = 0; m < M; ++m) std::copy(out[m], out[m] + ncols, y + m * ldy);
}

// All M rows of x through one block of weights, six rows at a time.
template <typename W>
void block_rows(const float* x, int64_t M, int64_t K, const W* w, float* y, int64_t ldy, int64_t ncols) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * ldy;
    switch (std::min(kRows, M - m0)) {
      case 1: block_kernel<1>(xm, K, w, ym, ldy, ncols); break;
      case 2: block_kernel<2>(xm, K, w, ym, ldy, ncols); break;
      case 3: block_kernel<3>(xm, K, w, ym, ldy, ncols); break;
      case 4: block_kernel<4>(xm, K, w, ym, ldy, ncols); break;
      case 5: block_kernel<5>(xm, K, w, ym, ldy, ncols); break;
      default: block_kernel<6>(xm, K, w, ym, ldy, ncols); break;
    }
  }
}

// --- AVX-512 (where the CPU has it): one zmm register holds a block's 16 columns, so a k-step is one
// conversion and M FMAs instead of two and 2M, and 32 registers hold more rows per chunk. Each output
// is still one fp32 FMA chain over k = 0..K-1 from zero, so it computes exactly the AVX2 path's floats.
constexpr int64_t kRows512 = 12;  // rows per chunk: a decoding pass or a 12-node tree in one chunk
constexpr int64_t kRows512Pair = 12;  // a prefill's rows per chunk over two converted (fp32) blocks

__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

// y[M, ncols] = x[M, K] @ one fp16 block's weights, streamed (prefetched as in block_kernel).
template <int M>
__attribute__((target("avx512f"))) inline void block_kernel512(const float* x, int64_t K, const uint16_t* w, float* y,
                                                               int64_t ldy, int64_t ncols) {
  __m512 acc[M];
#pragma GCC unroll 24
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchSteps) * kCols), _MM_HINT_T0);
    const __m512 wk = load16(w + k * kCols);
#pragma GCC unroll 24
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), wk, acc[m]);
  }
  if (ncols == kCols) {
#pragma GCC unroll 24
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
    return;
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << ncols) - 1);
#pragma GCC unroll 24
  for (int m = 0; m < M; ++m) _mm512_mask_storeu_ps(y + m * ldy, keep, acc[m]);
}

// Two converted blocks (32 columns) x M rows: each broadcast of x feeds two FMAs.
template <int M>
__attribute__((target("avx512f"))) inline void pair_kernel512(const float* x, int64_t K, const float* w0,
                                                              const float* w1, float* y, int64_t ldy) {
  __m512 acc0[M], acc1[M];
#pragma GCC unroll 24
  for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 a = _mm512_loadu_ps(w0 + k * kCols), b = _mm512_loadu_ps(w1 + k * kCols);
#pragma GCC unroll 24
    for (int m = 0; m < M; ++m) {
      const __m512 xk = _mm512_set1_ps(x[m * K + k]);
      acc0[m] = _mm512_fmadd_ps(xk, a, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(xk, b, acc1[m]);
    }
  }
#pragma GCC unroll 24
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(y + m * ldy, acc0[m]);
    _mm512_storeu_ps(y + m * ldy + kCols, acc1[m]);
  }
}

template <int M>
__attribute__((target("avx512f"))) void pair_rows512(const float* x, int64_t rows, int64_t K, const float* w0,
                                                     const float* w1, float* y, int64_t ldy) {
  int64_t m0 = 0;
  for (; m0 + M <= rows; m0 += M) pair_kernel512<M>(x + m0 * K, K, w0, w1, y + m0 * ldy, ldy);
  if constexpr (M > 1) {
    if (m0 < rows) pair_rows512<M / 2>(x + m0 * K, rows - m0, K, w0, w1, y + m0 * ldy, ldy);
  }
}

// All M rows through one fp16 block as it streams in, 12 rows at a time (decoding: one chunk).
__attribute__((target("avx512f"))) void streamed_rows512(const float* x, int64_t M, int64_t K, const uint16_t* w,
                                                         float* y, int64_t ldy, int64_t ncols) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows512) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * ldy;
    switch (std::min(kRows512, M - m0)) {
      case 1: block_kernel512<1>(xm, K, w, ym, ldy, ncols); break;
      case 2: block_kernel512<2>(xm, K, w, ym, ldy, ncols); break;
      case 3: block_kernel512<3>(xm, K, w, ym, ldy, ncols); break;
      case 4: block_kernel512<4>(xm, K, w, ym, ldy, ncols); break;
      case 5: block_kernel512<5>(xm, K, w, ym, ldy, ncols); break;
      case 6: block_kernel512<6>(xm, K, w, ym, ldy, ncols); break;
      case 7: block_kernel512<7>(xm, K, w, ym, ldy, ncols); break;
      case 8: block_kernel512<8>(xm, K, w, ym, ldy, ncols); break;
      case 9: block_kernel512<9>(xm, K, w, ym, ldy, ncols); break;
      case 10: block_kernel512<10>(xm, K, w, ym, ldy, ncols); break;
      case 11: block_kernel512<11>(xm, K, w, ym, ldy, ncols); break;
      default: block_kernel512<12>(xm, K, w, ym, ldy, ncols); break;
    }
  }
}

inline void convert_block(const uint16_t* w, int64_t count, float* out) {
  for (int64_t i = 0; i < count; i += 8) _mm256_storeu_ps(out + i, load8(w + i));
}

// y = x @ W^T on the AVX-512 kernels. Decoding streams each block once for all rows; a prefill
// converts blocks in pairs to fp32 once for all its rows (an odd or partial last block is streamed).
void linear512(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t blocks, float* y, int64_t n) {
  if (M <= kMaxStreamedRows) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        streamed_rows512(x, M, K, w + b * K * kCols, y + b * kCols, n, std::min(kCols, n - b * kCols));
    });
    return;
  }
  const int64_t full_pairs = (n / kCols) / 2;  // pairs of full 16-column blocks
  at::parallel_for(0, full_pairs + 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> converted(2 * K * kCols);
    float* wf = converted.data();
    for (int64_t p = begin; p < end; ++p) {
      if (p < full_pairs) {
        convert_block(w + 2 * p * K * kCols, 2 * K * kCols, wf);
        pair_rows512<kRows512Pair>(x, M, K, wf, wf + K * kCols, y + 2 * p * kCols, n);
        continue;
      }
      for (int64_t b = 2 * full_pairs; b < blocks; ++b)  // what is left (at most two blocks): streamed
        streamed_rows512(x, M, K, w + b * K * kCols, y + b * kCols, n, std::min(kCols, n - b * kCols));
    }
  });
}

bool use_avx512() {
  // __builtin_cpu_init: the CPU model is also right if this first runs from another library's constructor.
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has && !std::getenv("FLASH_NO_AVX512");  // read per call: tests compare both paths in one process
}

at::Tensor fp16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "fp16_linear: x must be a float32 CPU tensor");
  TORCH_CHECK(packed.scalar_type() == at::kHalf && packed.dim() == 3 && packed.size(2) == kCols &&
                  packed.is_contiguous(), "fp16_linear: packed must be fp16 [N/16, K, 16], contiguous");
  const int64_t K = x.size(-1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == K && blocks * kCols >= n && (blocks - 1) * kCols < n,
              "fp16_linear: shapes do not match");
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  at::Tensor y = at::empty({M, n}, x.options());
  const float* xp = rows.const_data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::Half>());
  float* yp = y.mutable_data_ptr<float>();
  if (use_avx512()) {
    linear512(xp, M, K, wp, blocks, yp, n);
  } else {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> converted(M > kMaxStreamedRows ? K * kCols : 0);
      for (int64_t b = begin; b < end; ++b) {
        const uint16_t* wb = wp + b * K * kCols;
        const int64_t n0 = b * kCols, ncols = std::min(kCols, n - n0);
        if (M <= kMaxStreamedRows) {
          block_rows(xp, M, K, wb, yp + n0, n, ncols);
          continue;
        }
        float* wf = converted.data();
        convert_block(wb, K * kCols, wf);
        block_rows(xp, M, K, static_cast<const float*>(wf), yp + n0, n, ncols);
      }
    });
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY(flash_fp16, m) {
  m.def("linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(fp16_linear));
}
