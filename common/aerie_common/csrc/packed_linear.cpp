// x @ W.T for a few rows of fp32 activations, with W kept packed in the exact form its
// values came in (packed_weights.py): a GGUF's Q4_1 or Q8_0 blocks, or bf16. Each row of W
// is unpacked, block by block in registers, into the very fp32 values transformers loaded
// (an fp16 scale times a 4- or 8-bit level is exact in fp32, so only gguf-py's one rounded
// addition remains) and multiplied in fp32. A forward of a few tokens reads its weights once, so reading
// 0.6-2 bytes a weight instead of 4 is what makes it faster.
//
// Every output element is one dot product summed in one fixed order, whatever the number
// of rows: a row's result does not depend on the rows beside it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;  // GGUF's block of weights sharing a scale

#ifdef __AVX512F__
constexpr bool kVectorised = true;
constexpr int kRowsPerPass = 8;  // 8 rows x 2 sums in registers

// Each unpacks block b of one row of W into two registers: weights 0-15 and 16-31.
struct Q4_1Row {
  const uint8_t* q;
  const float* d;
  const float* m;
  inline void unpack(int64_t b, __m512& lo, __m512& hi) const {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
    const __m512 scale = _mm512_set1_ps(d[b]), min = _mm512_set1_ps(m[b]);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, low4)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), low4)));
    lo = _mm512_fmadd_ps(lo, scale, min);  // scale * q is exact in fp32: fused or not, the same sum
    hi = _mm512_fmadd_ps(hi, scale, min);
  }
};

struct Q8_0Row {
  const int8_t* q;
  const float* d;
  inline void unpack(int64_t b, __m512& lo, __m512& hi) const {
    const __m512 scale = _mm512_set1_ps(d[b]);
    const __m128i* block = reinterpret_cast<const __m128i*>(q + b * kBlock);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(block))), scale);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(block + 1))), scale);
  }
};

struct BF16Row {
  const uint16_t* q;
  static inline __m512 widen(const uint16_t* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  inline void unpack(int64_t b, __m512& lo, __m512& hi) const {
    lo = widen(q + b * kBlock);
    hi = widen(q + b * kBlock + 16);
  }
};

// R rows of x times one row of W, unpacked block by block in registers, into R outputs N
// apart. Each row sums in two 16-lane partial sums (weights k % 32 < 16 and >= 16), added
// lane-wise, then across lanes: the same order for any R.
template <int R, typename Row>
inline void dot_rows(const float* x, int64_t K, const Row& row, float* out, int64_t N) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512 w0, w1;
    row.unpack(b, w0, w1);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + b * kBlock), w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + b * kBlock + 16), w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 (most AMD EPYCs before Zen 4, most desktop CPUs): 8 lanes, so a block of 32 weights
// is four registers, and each row of x keeps four partial sums, one per quarter of a block.
constexpr bool kVectorised = true;
// Rows per pass: 3 fill the 16 registers (12 sums, 4 weights); with the spills of 5 the
// 5-token forward of the default target took 23.7 ms, against 25.5 with 3 and 24.1 with 8.
constexpr int kRowsPerPass = 5;

struct Q4_1Row {
  const uint8_t* q;
  const float* d;
  const float* m;
  inline void unpack(int64_t b, __m256 w[4]) const {
    // Bytes 0-7 hold weights 0-7 (low nibbles) and 16-23 (high), bytes 8-15 weights 8-15
    // and 24-31: widen 8 bytes to 32-bit lanes once, then take either nibble in place.
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    const __m256 scale = _mm256_set1_ps(d[b]), min = _mm256_set1_ps(m[b]);
    for (int half = 0; half < 2; ++half) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + b * 16 + 8 * half));
      const __m256i both = _mm256_cvtepu8_epi32(bytes);
      const __m256i levels[2] = {_mm256_and_si256(both, low4), _mm256_srli_epi32(both, 4)};
      for (int nibble = 0; nibble < 2; ++nibble)  // scale * q is exact in fp32: fused or not, the same sum
        w[2 * nibble + half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(levels[nibble]), scale, min);
    }
  }
};

struct Q8_0Row {
  const int8_t* q;
  const float* d;
  inline void unpack(int64_t b, __m256 w[4]) const {
    const __m256 scale = _mm256_set1_ps(d[b]);
    for (int i = 0; i < 4; ++i) {
      const __m128i levels = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + b * kBlock + 8 * i));
      w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(levels)), scale);
    }
  }
};

struct BF16Row {
  const uint16_t* q;
  inline void unpack(int64_t b, __m256 w[4]) const {
    for (int i = 0; i < 4; ++i) {
      const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * kBlock + 8 * i));
      w[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    }
  }
};

template <int R, typename Row>
inline void dot_rows(const float* x, int64_t K, const Row& row, float* out, int64_t N) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m256 w[4];
    row.unpack(b, w);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i)
        acc[r][i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + b * kBlock + 8 * i), w[i], acc[r][i]);
  }
  for (int r = 0; r < R; ++r) {
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    out[r * N] = _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
  }
}

#else  // portable and slow: correct everywhere; the engine packs only where kVectorised
constexpr bool kVectorised = false;
constexpr int kRowsPerPass = 8;

struct Q4_1Row {
  const uint8_t* q;
  const float* d;
  const float* m;
  inline float at(int64_t k) const {
    const int64_t b = k / kBlock, j = k % kBlock;
    const uint8_t byte = q[b * 16 + j % 16];
    const float scaled = static_cast<float>(j < 16 ? byte & 0x0F : byte >> 4) * d[b];
    return scaled + m[b];
  }
};

struct Q8_0Row {
  const int8_t* q;
  const float* d;
  inline float at(int64_t k) const { return static_cast<float>(q[k]) * d[k / kBlock]; }
};

struct BF16Row {
  const uint16_t* q;
  inline float at(int64_t k) const {
    const uint32_t bits = static_cast<uint32_t>(q[k]) << 16;
    float w;
    std::memcpy(&w, &bits, 4);
    return w;
  }
};

template <int R, typename Row>
inline void dot_rows(const float* x, int64_t K, const Row& row, float* out, int64_t N) {
  for (int r = 0; r < R; ++r) {
    float sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += x[r * K + k] * row.at(k);
    out[r * N] = sum;
  }
}
#endif

// x[..., K] @ W.T -> [..., N], with row_of(n) the n-th row of W.
template <typename RowOf>
torch::Tensor packed_linear(const torch::Tensor& input, int64_t N, RowOf row_of) {
  TORCH_CHECK(input.scalar_type() == torch::kFloat32, "x must be float32");
  const int64_t K = input.size(-1);
  TORCH_CHECK(K % kBlock == 0, "the inner dimension must be a multiple of ", kBlock);
  const torch::Tensor x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  auto out = torch::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const auto row = row_of(n);
      // Up to kRowsPerPass rows of x per pass over the row of W, their sums in registers.
      for (int64_t r = 0; r < M; r += kRowsPerPass) {
        const float* xr = xp + r * K;
        float* out_r = op + r * N + n;
        switch (std::min<int64_t>(M - r, kRowsPerPass)) {
          case 1: dot_rows<1>(xr, K, row, out_r, N); break;
          case 2: dot_rows<2>(xr, K, row, out_r, N); break;
          case 3: dot_rows<3>(xr, K, row, out_r, N); break;
          case 4: dot_rows<4>(xr, K, row, out_r, N); break;
          case 5: dot_rows<5>(xr, K, row, out_r, N); break;
          case 6: dot_rows<6>(xr, K, row, out_r, N); break;
          case 7: dot_rows<7>(xr, K, row, out_r, N); break;
          default: dot_rows<8>(xr, K, row, out_r, N); break;
        }
      }
    }
  });
  return out;
}

}  // namespace

namespace aerie {

torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  const int64_t K = x.size(-1), blocks = K / kBlock;
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.size(1) * 2 == K && d.size(1) == blocks && m.size(1) == blocks,
              "packed Q4_1 weights do not match x");
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const float* dp = d.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  return packed_linear(x, qs.size(0), [&](int64_t n) { return Q4_1Row{q + n * (K / 2), dp + n * blocks, mp + n * blocks}; });
}

torch::Tensor q8_0_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d) {
  const int64_t K = x.size(-1), blocks = K / kBlock;
  TORCH_CHECK(qs.scalar_type() == torch::kInt8 && qs.size(1) == K && d.size(1) == blocks,
              "packed Q8_0 weights do not match x");
  const int8_t* q = qs.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  return packed_linear(x, qs.size(0), [&](int64_t n) { return Q8_0Row{q + n * K, dp + n * blocks}; });
}

torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor weight) {
  const int64_t K = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.size(1) == K, "bf16 weights do not match x");
  const uint16_t* q = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  return packed_linear(x, weight.size(0), [&](int64_t n) { return BF16Row{q + n * K}; });
}

bool vectorised() { return kVectorised; }

}  // namespace aerie

void define_packed_linear(pybind11::module& module) {
  using namespace aerie;
  module.def("q4_1_linear", &q4_1_linear, "x @ W.T, W packed as Q4_1 blocks (qs, scale, minimum)");
  module.def("q8_0_linear", &q8_0_linear, "x @ W.T, W packed as Q8_0 blocks (qs, scale)");
  module.def("bf16_linear", &bf16_linear, "x @ W.T, W in bf16");
  module.def("vectorised", &vectorised, "whether this build has a vectorised (AVX-512 or AVX2) path of the packed kernels");
}
