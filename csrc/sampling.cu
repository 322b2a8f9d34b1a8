// Fused sampler (DESIGN §4.5): repetition penalty, temperature, top-k, top-p and one
// inverse-CDF draw per row, without sorting. The oracle is the torch path of
// r2ec_fast/ops/sampling.py (HF's logits processors, same order); see there for the contract.
//
// One thread block of kThreads threads per row. The row is never copied: every pass re-reads
// the raw logits (fp32/bf16/fp16) and recomputes the processed value
//     x = penalised(logit) / temperature
// in fp32 with IEEE division (the same operations as the torch path on CPU; torch on CUDA
// divides by a scalar through its reciprocal, so the two may differ by an ulp). A row of a
// 256k vocabulary is 1 MiB in fp32, more than a block's shared memory, but the B rows of one
// step (B x V x 2 bytes = 32 MiB for B = 64, bf16) fit an H100's 50 MiB L2, so the passes after
// the first should mostly read L2, not HBM (not profiled yet). Passes over the row:
//   - max: 1 (fused into the first top-k pass when top-k is on);
//   - top-k threshold, the k-th largest value counted with multiplicity (torch.topk's k-th
//     value): radix select on the order-preserving 32-bit key of the float, 8-bit digits,
//     4 passes; per-digit counts by integer atomics in shared memory (exact, so deterministic);
//   - top-p threshold: radix select on the same key with 4-bit digits, 8 passes, where a bucket
//     weighs exp(x - max) instead of 1 (first pass: the mass of the top-k kept set). Float
//     masses must be added in a fixed order to be deterministic, so every thread keeps its own
//     16 counters (16 x kThreads x 4 B = 32 KiB; 8-bit digits would need 512 KiB);
//   - without top-p, the kept mass: 1 pass;
//   - the draw: a block-wide prefix sum tile by tile in vocabulary order, stopping at the tile
//     that holds the token (half a pass on average).
// The rollout default (top_k 200, top_p 1) thus reads the row 4 + 1 + <=1 times.
//
// Top-p and ties. HF sorts ascending and removes a token when the cumulative probability up
// to and including it is <= 1 - top_p; in exact arithmetic that keeps a token iff the mass of
// the tokens sorted above it is < top_p. Here "above" means "strictly greater value": the kept
// set is {x >= t}, t the largest value whose mass at or above it reaches top_p x the kept
// mass. It equals HF's set except (1) when tied values straddle the cut, where HF keeps an
// arbitrary part of the tie (its sort is not stable) and this keeps all of it, and (2) at a
// token whose mass above lies within fp32 rounding of top_p (HF's cumsum over V fp32
// probabilities errs by ~1e-5 at V = 256k). Exact HF behaviour needs the sort; the tests use
// the torch path as the oracle and allow exactly these differences. Top-k ties are exact.
//
// Greedy (temperature 0) is not done here: it is an argmax, done by torch in sampling.py.
// Light headers on purpose: <torch/extension.h> pulls in the whole C++ frontend (nvcc -c:
// 3 min instead of 70 s on 2 cores); the tensor type, dispatch, empty and the pybind casters
// are all this file needs.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>
#include <tuple>

#include <torch/csrc/utils/pybind.h>

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTopPBits = 4;  // digit width of the top-p select
constexpr int kBuckets = 1 << kTopPBits;
static_assert(kBuckets == kWarps, "one warp adds up one top-p bucket");
constexpr unsigned kFull = 0xffffffffu;

struct Settings {
  int vocab;
  int top_k;  // 0: off (also when k >= V)
  bool top_p_on;
  float top_p, temperature, penalty;
  int bitmap_words;  // 0: no repetition penalty
  int64_t row_stride, col_stride, prev_len;
};

// Float -> unsigned key with the same order (negatives flipped, positives offset); -0 and +0
// share one key, as they compare equal.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x == 0.f ? 0.f : x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The processed value of id v of one row.
template <typename scalar_t>
struct Row {
  const scalar_t* logits;  // the row's first element
  int64_t col_stride;
  const uint32_t* penalised;  // shared-memory bitmap of the ids in prev_tokens, or nullptr
  float penalty, temperature;

  __device__ __forceinline__ float operator()(int v) const {
    float x = static_cast<float>(logits[static_cast<int64_t>(v) * col_stride]);
    if (penalised != nullptr && ((penalised[v >> 5] >> (v & 31)) & 1u)) {
      x = x < 0.f ? x * penalty : x / penalty;
    }
    return x / temperature;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Sum or max over the block in a fixed order; every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch /* kWarps + 1 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kWarps ? scratch[lane] : (kMax ? -INFINITY : 0.f);
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) scratch[kWarps] = w;
  }
  __syncthreads();
  const float result = scratch[kWarps];
  __syncthreads();  // scratch is reused by the next reduction
  return result;
}

// Inclusive prefix sum of one value per thread over the block; *total gets the block's sum.
__device__ float block_inclusive_scan(float w, float* warp_sums /* kWarps */, float* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float x = w;
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    float t = lane < kWarps ? warp_sums[lane] : 0.f;
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(kFull, t, o);
      if (lane >= o) t += y;
    }
    if (lane < kWarps) warp_sums[lane] = t;
  }
  __syncthreads();
  const float offset = warp > 0 ? warp_sums[warp - 1] : 0.f;
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is rewritten by the next tile
  return offset + x;
}

template <class RowT>
__device__ float row_max(const RowT& row, int vocab, float* scratch) {
  float m = -INFINITY;
  for (int v = threadIdx.x; v < vocab; v += kThreads) m = fmaxf(m, row(v));
  return block_reduce<true>(m, scratch);
}

// The k-th largest value of the row (with multiplicity), 4 passes; *max_out gets the row max
// from the first one.
template <class RowT>
__device__ float kth_largest(const RowT& row, int vocab, int k, uint32_t* hist /* 256 */,
                             uint32_t* state, float* scratch, float* max_out) {
  uint32_t prefix = 0, mask = 0, remaining = static_cast<uint32_t>(k);
  float m = -INFINITY;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0u;
    __syncthreads();
    for (int v = threadIdx.x; v < vocab; v += kThreads) {
      const float x = row(v);
      if (shift == 24) m = fmaxf(m, x);
      const uint32_t key = order_key(x);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // 256 steps at most: cheap next to a pass over the row
      uint32_t d = 255;
      while (d > 0 && remaining > hist[d]) remaining -= hist[d--];
      state[0] = prefix | (d << shift);
      state[1] = remaining;
    }
    __syncthreads();
    prefix = state[0];
    remaining = state[1];
    mask |= 0xffu << shift;
  }
  *max_out = block_reduce<true>(m, scratch);
  return key_value(prefix);
}

// The smallest kept value under top-p among the values >= k_floor (top-k's threshold), 8 passes;
// *kept_mass gets sum exp(x - m) over the values >= the result.
template <class RowT>
__device__ float top_p_threshold(const RowT& row, int vocab, float k_floor, float m, float top_p,
                                 float* counters /* kBuckets x kThreads */, float* bucket_mass,
                                 uint32_t* state, float* fstate /* 3 */, float* kept_mass) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* mine = counters + threadIdx.x;  // column threadIdx.x: conflict-free, one owner
  uint32_t prefix = 0, mask = 0;
  for (int shift = 32 - kTopPBits; shift >= 0; shift -= kTopPBits) {
    for (int d = 0; d < kBuckets; ++d) mine[d * kThreads] = 0.f;
    for (int v = threadIdx.x; v < vocab; v += kThreads) {
      const float x = row(v);
      if (!(x >= k_floor)) continue;  // removed by top-k
      const uint32_t key = order_key(x);
      if ((key & mask) == prefix) mine[((key >> shift) & (kBuckets - 1)) * kThreads] += expf(x - m);
    }
    __syncthreads();
    float s = 0.f;  // warp w adds up bucket w, always in the same order
    for (int j = lane; j < kThreads; j += 32) s += counters[warp * kThreads + j];
    s = warp_sum(s);
    if (lane == 0) bucket_mass[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      float above = fstate[0], target = fstate[1];  // mass above the prefix's range; goal
      if (shift == 32 - kTopPBits) {  // all kept values are in range: this is the kept mass
        float total = 0.f;
        for (int d = kBuckets - 1; d >= 0; --d) total += bucket_mass[d];
        above = 0.f;
        target = top_p * total;
      }
      // the first bucket from the top at which the mass at or above it reaches the target
      int chosen = -1, lowest = 0;
      float acc = above;
      for (int d = kBuckets - 1; d >= 0; --d) {
        if (bucket_mass[d] > 0.f) lowest = d;
        if (acc + bucket_mass[d] >= target) {
          chosen = d;
          break;
        }
        acc += bucket_mass[d];
      }
      if (chosen < 0) {  // rounding left the buckets short of the target: keep all in range
        chosen = lowest;
        acc = above;
        for (int d = kBuckets - 1; d > chosen; --d) acc += bucket_mass[d];
      }
      state[0] = prefix | (static_cast<uint32_t>(chosen) << shift);
      fstate[0] = acc;
      fstate[1] = target;
      fstate[2] = bucket_mass[chosen];
    }
    __syncthreads();
    prefix = state[0];
    mask |= static_cast<uint32_t>(kBuckets - 1) << shift;
  }
  *kept_mass = fstate[0] + fstate[2];  // above the final key + the final key's own mass
  return key_value(prefix);
}

template <class RowT>
__device__ float kept_mass(const RowT& row, int vocab, float k_floor, float m, float* scratch) {
  float s = 0.f;
  for (int v = threadIdx.x; v < vocab; v += kThreads) {
    const float x = row(v);
    if (x >= k_floor) s += expf(x - m);
  }
  return block_reduce<false>(s, scratch);
}

// The first id (vocabulary order) whose running kept mass exceeds target; the last kept id if
// none does (target at or past the sum, by rounding).
template <class RowT>
__device__ int inverse_cdf(const RowT& row, int vocab, float threshold, float m, float target,
                           float* warp_sums, int* first_hit, int* last_kept) {
  float running = 0.f;  // the same in every thread
  int my_last = -1;
  for (int base = 0; base < vocab; base += kThreads) {
    const int v = base + threadIdx.x;
    float w = 0.f;
    if (v < vocab) {
      const float x = row(v);
      if (x >= threshold) w = expf(x - m);
    }
    if (w > 0.f) my_last = v;
    float tile_total;
    const float inclusive = block_inclusive_scan(w, warp_sums, &tile_total);
    const bool hit = w > 0.f && running + inclusive > target;
    if (__syncthreads_or(hit)) {
      if (hit) atomicMin(first_hit, v);
      __syncthreads();
      return *first_hit;
    }
    running += tile_total;
  }
  atomicMax(last_kept, my_last);
  __syncthreads();
  return *last_kept;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sample_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ prev_tokens,
                   const float* __restrict__ uniform, const Settings s,
                   int64_t* __restrict__ tokens, float* __restrict__ logprobs,
                   float* __restrict__ thresholds) {
  extern __shared__ uint32_t dynamic_smem[];  // [penalty bitmap | top-p counters]
  __shared__ uint32_t hist[256];
  __shared__ uint32_t state[2];
  __shared__ float fstate[3];
  __shared__ float scratch[kWarps + 1];
  __shared__ float bucket_mass[kBuckets];
  __shared__ int first_hit, last_kept;
  const int64_t b = blockIdx.x;

  // One bit per vocabulary id: membership in O(1) on every pass; prev_tokens (prompt +
  // generated, often thousands of ids, repeats and -1 pads) is read once.
  uint32_t* penalised = nullptr;
  if (s.bitmap_words > 0) {
    penalised = dynamic_smem;
    for (int i = threadIdx.x; i < s.bitmap_words; i += kThreads) penalised[i] = 0u;
    __syncthreads();
    const int64_t* ids = prev_tokens + b * s.prev_len;
    for (int64_t j = threadIdx.x; j < s.prev_len; j += kThreads) {
      const int64_t id = ids[j];
      if (id >= 0 && id < s.vocab) atomicOr(&penalised[id >> 5], 1u << (id & 31));
    }
    __syncthreads();
  }
  float* counters = reinterpret_cast<float*>(dynamic_smem + s.bitmap_words);
  const Row<scalar_t> row{logits + b * s.row_stride, s.col_stride, penalised, s.penalty,
                          s.temperature};

  float m, k_floor = -INFINITY;
  if (s.top_k > 0) {
    k_floor = kth_largest(row, s.vocab, s.top_k, hist, state, scratch, &m);
  } else {
    m = row_max(row, s.vocab, scratch);
  }
  float threshold = k_floor, total;
  if (s.top_p_on) {
    threshold = top_p_threshold(row, s.vocab, k_floor, m, s.top_p, counters, bucket_mass, state,
                                fstate, &total);
  } else {
    total = kept_mass(row, s.vocab, k_floor, m, scratch);
  }
  if (thresholds != nullptr && threadIdx.x == 0) thresholds[b] = threshold;
  if (uniform == nullptr) return;

  if (threadIdx.x == 0) {
    first_hit = INT_MAX;
    last_kept = -1;
  }
  __syncthreads();
  const float target = uniform[b] * total;
  const int token = inverse_cdf(row, s.vocab, threshold, m, target, scratch, &first_hit,
                                &last_kept);
  if (threadIdx.x == 0) {
    const int safe = token < 0 ? 0 : token;  // only for a row without a finite logit
    tokens[b] = safe;
    logprobs[b] = (row(safe) - m) - logf(total);
  }
}

// (tokens [B] int64, logprobs [B] fp32, thresholds [B] fp32 or undefined); uniform nullptr:
// thresholds only (the smallest kept processed value per row; tests compare kept sets).
std::tuple<at::Tensor, at::Tensor, at::Tensor> launch(
    const at::Tensor& logits, const at::Tensor& prev_tokens, const at::Tensor* uniform,
    double temperature, int64_t top_k, double top_p, double repetition_penalty,
    bool want_thresholds) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_floating_point(),
              "logits must be a floating-point [B, V] CUDA tensor");
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab < INT_MAX, "vocabulary size must be in [1, 2^31 - 1)");
  TORCH_CHECK(prev_tokens.device() == logits.device() && prev_tokens.dim() == 2 &&
                  prev_tokens.size(0) == batch && prev_tokens.scalar_type() == at::kLong,
              "prev_tokens must be an int64 [B, L] tensor on the logits' device (L may be 0)");
  TORCH_CHECK(temperature > 0, "temperature must be > 0 (greedy is an argmax, done in torch)");
  TORCH_CHECK(top_k >= 0 && top_p > 0 && top_p <= 1 && repetition_penalty > 0,
              "need top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto prev = prev_tokens.contiguous();
  at::Tensor u;
  if (uniform != nullptr) {
    TORCH_CHECK(uniform->device() == logits.device() && uniform->dim() == 1 &&
                    uniform->size(0) == batch,
                "uniform must be a [B] tensor on the logits' device");
    u = uniform->to(at::kFloat).contiguous();
  }
  auto tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({batch}, logits.options().dtype(at::kFloat));
  at::Tensor thresholds;
  if (want_thresholds) thresholds = at::empty({batch}, logits.options().dtype(at::kFloat));
  if (batch == 0) return {tokens, logprobs, thresholds};

  Settings s;
  s.vocab = static_cast<int>(vocab);
  s.top_k = (top_k > 0 && top_k < vocab) ? static_cast<int>(top_k) : 0;
  s.top_p_on = top_p < 1.0;
  s.top_p = static_cast<float>(top_p);
  s.temperature = static_cast<float>(temperature);
  s.penalty = static_cast<float>(repetition_penalty);
  s.bitmap_words = (repetition_penalty != 1.0 && prev.size(1) > 0)
                       ? static_cast<int>((vocab + 31) / 32) : 0;
  s.row_stride = logits.stride(0);
  s.col_stride = logits.stride(1);
  s.prev_len = prev.size(1);
  const size_t dynamic_bytes =
      sizeof(uint32_t) * (static_cast<size_t>(s.bitmap_words) +
                          (s.top_p_on ? static_cast<size_t>(kBuckets) * kThreads : 0));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "r2ec_sample",
                                  [&] {
    const auto kernel = &sample_rows_kernel<scalar_t>;
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          logits.get_device()));
    TORCH_CHECK(attributes.sharedSizeBytes + dynamic_bytes <= static_cast<size_t>(optin),
                "the sampling kernel needs ", attributes.sharedSizeBytes + dynamic_bytes,
                " bytes of shared memory per block (V = ", vocab,
                " with a repetition penalty), the device allows ", optin);
    if (attributes.sharedSizeBytes + dynamic_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(dynamic_bytes)));
    }
    kernel<<<static_cast<unsigned>(batch), kThreads, dynamic_bytes, stream>>>(
        logits.data_ptr<scalar_t>(), prev.data_ptr<int64_t>(),
        uniform != nullptr ? u.data_ptr<float>() : nullptr, s, tokens.data_ptr<int64_t>(),
        logprobs.data_ptr<float>(), want_thresholds ? thresholds.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {tokens, logprobs, thresholds};
}

std::tuple<at::Tensor, at::Tensor> sample(const at::Tensor& logits, const at::Tensor& prev_tokens,
                                          const at::Tensor& uniform, double temperature,
                                          int64_t top_k, double top_p,
                                          double repetition_penalty) {
  auto out = launch(logits, prev_tokens, &uniform, temperature, top_k, top_p,
                    repetition_penalty, false);
  return {std::get<0>(out), std::get<1>(out)};
}

at::Tensor kept_threshold(const at::Tensor& logits, const at::Tensor& prev_tokens,
                          double temperature, int64_t top_k, double top_p,
                          double repetition_penalty) {
  return std::get<2>(launch(logits, prev_tokens, nullptr, temperature, top_k, top_p,
                            repetition_penalty, true));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample", &sample,
        "One inverse-CDF draw per row after repetition penalty, temperature, top-k, top-p: "
        "(tokens [B] int64, logprobs [B] fp32)",
        pybind11::arg("logits"), pybind11::arg("prev_tokens"), pybind11::arg("uniform"),
        pybind11::arg("temperature"), pybind11::arg("top_k"), pybind11::arg("top_p"),
        pybind11::arg("repetition_penalty"));
  m.def("kept_threshold", &kept_threshold,
        "The smallest kept processed value per row ([B] fp32): kept = processed >= it",
        pybind11::arg("logits"), pybind11::arg("prev_tokens"), pybind11::arg("temperature"),
        pybind11::arg("top_k"), pybind11::arg("top_p"), pybind11::arg("repetition_penalty"));
}
