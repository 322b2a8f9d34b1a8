// Fused sampler (DESIGN §4.5): repetition penalty, temperature, top-k, top-p and one
// inverse-CDF draw per row, without sorting. The oracle is the torch path of
// r2ec_fast/ops/sampling.py (HF's logits processors, same order); see there for the contract.
//
// The row is never copied: every pass re-reads the raw logits (fp32/bf16/fp16) and recomputes
//     x = penalised(logit) / temperature
// in fp32 with IEEE division (the same operations as the torch path on CPU; torch on CUDA
// divides by a scalar through its reciprocal, so the two may differ by an ulp).
//
// Tiles. A row is cut into tiles of 256 consecutive ids; lane l of a warp holds ids
// 8l .. 8l+7 of a tile (one 16-byte load for bf16/fp16, two for fp32, when the row is
// contiguous and aligned; element loads otherwise and at the row's end). Three launches:
//   1. (only with a repetition penalty) one bit per (row, id) in prev_tokens, in a global
//      bitmap (B x V / 8 bytes, zeroed by torch): prev_tokens is read once, the passes below
//      test 8 ids with one 32-bit read;
//   2. tile_stats_kernel, grid (tiles / 32, B), the only full pass over the logits, spread over
//      the whole GPU: per tile its max and sum exp(x - tile max) (B x V / 32 bytes);
//   3. sample_rows_kernel, one block of 512 threads per row, which reads the tile statistics
//      and only the tiles that can matter:
//      - max: the max of the tile maxes;
//      - no truncation: tile t weighs W_t = exp(max_t - max) * sum_t; the draw scans the W_t
//        (one block-wide prefix sum over V / 256 values), then one warp scans the one tile
//        that holds the target mass (8 ids per lane + a warp scan). No second full pass.
//      - top-k: L = the k-th largest tile max (radix select over V / 256 values) is a lower
//        bound of the k-th largest value (k tiles each hold a value >= L), so only the tiles
//        whose max is >= L can hold a kept id (~k tiles of LLM-like rows, all tiles of a flat
//        row). One pass over those tiles copies the values >= L to shared memory (a few
//        hundred usually; up to 4096), the k-th largest of those is the threshold (radix
//        select, 8-bit digits, 4 passes in shared memory; integer counts by atomics, exact and
//        deterministic). More than 4096 values >= L (a row of ties): the 4 passes read the
//        candidate tiles instead. Then one pass over the candidate tiles gives each its kept
//        mass W_t, and the draw goes as above.
//      - top-p: radix select on the same key with 4-bit digits, 8 passes over the candidate
//        tiles (all tiles without top-k), where a bucket weighs exp(x - max) instead of 1.
//        Float masses must be added in a fixed order to be deterministic, so every thread
//        keeps its own 16 counters (16 x 512 x 4 B = 32 KiB; 8-bit digits would need
//        512 KiB). Then W_t and the draw as for top-k.
//   Every float sum has a fixed order (per lane, then a fixed shuffle tree, then a fixed
//   block tree), so the same logits and uniform give the same token and log-prob bits.
// Measured before this layout (H200, 64 x 256000 fp32, no truncation): 765 us with one block
// per row re-reading the row with scalar loads and a tile-by-tile block scan for the draw
// (500 tiles of 512 ids, four __syncthreads each). Now: one full pass at HBM bandwidth plus
// reads of the tile statistics and of ~k tiles per row (estimate, not yet profiled).
//
// The draw: the token is the first id (vocabulary order) whose running kept mass exceeds
// target = u x total, total = the sum of the W_t in the draw's own prefix-sum order. target
// >= total (u rounded to 1) gives the last kept id of the row; when rounding leaves the
// running sums inside the tile that crossed short of the target, its last kept id. Inside a
// tile the weights are recomputed as exp(x - max), the same bits as W_t's terms for truncated
// rows; without truncation W_t > 0 implies exp(max_t - max) > 0, the weight of the tile's
// max, so a tile with W_t > 0 always holds a positive weight. "Kept" in the draw means a
// positive weight, as in the torch path (an exp that underflows to 0 is never drawn).
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
// No host sync: the workspace (tile statistics, candidate tile lists, bitmap) has a size set
// by the shapes, so a launch can be captured in a CUDA graph.
// Greedy (temperature 0) is not done here: it is an argmax, done by torch in sampling.py.
// Light headers on purpose: <torch/extension.h> pulls in the whole C++ frontend (nvcc -c:
// 3 min instead of 70 s on 2 cores); the tensor type, dispatch, empty and the pybind casters
// are all this file needs.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

#include <torch/csrc/utils/pybind.h>

namespace {

constexpr int kPerLane = 8;            // consecutive ids per lane: one 16-byte load of bf16
constexpr int kTile = 32 * kPerLane;   // ids per tile (one warp)
constexpr int kThreads = 512;          // sample_rows_kernel: one block per row
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;             // tiles in flight per warp in sample_rows_kernel
constexpr int kStatsWarps = 8;         // tile_stats_kernel: 8 warps x 4 tiles per block
constexpr int kTilesPerWarp = 4;
constexpr int kTilesPerStatsBlock = kStatsWarps * kTilesPerWarp;
constexpr int kMaxHeld = 4096;         // top-k: values >= L held in shared memory
constexpr int kTopPBits = 4;           // digit width of the top-p select
constexpr int kBuckets = 1 << kTopPBits;
static_assert(kBuckets == kWarps, "one warp adds up one top-p bucket");
constexpr int kTopPCounters = kBuckets * kThreads;
constexpr unsigned kFull = 0xffffffffu;

struct Settings {
  int vocab, num_tiles;
  int top_k;  // 0: off (also when k >= V)
  bool top_p_on, vectorised;
  float top_p, temperature, penalty;
  int bitmap_words;  // per row; 0: no repetition penalty
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

// 16-byte loads per lane: 1 for bf16/fp16, 2 for fp32, 4 for fp64.
template <typename scalar_t>
constexpr int kLoads = static_cast<int>(sizeof(scalar_t)) * kPerLane / 16;

// The processed values of one row.
template <typename scalar_t>
struct Row {
  const scalar_t* logits;  // the row's first element
  int64_t col_stride;
  int vocab;
  bool vectorised;            // contiguous rows, 16-byte aligned lane slices
  const uint32_t* penalised;  // the row's bitmap of the ids in prev_tokens, or nullptr
  float penalty, temperature;

  __device__ __forceinline__ float process(float x, bool hit) const {
    if (hit) x = x < 0.f ? x * penalty : x / penalty;
    return x / temperature;
  }

  __device__ __forceinline__ float operator()(int v) const {
    const float x = static_cast<float>(logits[static_cast<int64_t>(v) * col_stride]);
    return process(x, penalised != nullptr && ((penalised[v >> 5] >> (v & 31)) & 1u));
  }

  // This lane's values of tile `tile`: x[i] is id tile * 256 + lane * 8 + i. Returns how many
  // of the 8 are ids < vocab (a prefix); the others are 0 and must be ignored.
  __device__ __forceinline__ int load(int tile, int lane, float (&x)[kPerLane]) const {
    const int v0 = tile * kTile + lane * kPerLane;  // < vocab + 256 <= INT_MAX (launch check)
    const int n = min(max(vocab - v0, 0), kPerLane);
    if (vectorised && n == kPerLane) {
      uint4 raw[kLoads<scalar_t>];
#pragma unroll
      for (int k = 0; k < kLoads<scalar_t>; ++k) {
        raw[k] = reinterpret_cast<const uint4*>(logits + v0)[k];
      }
      const scalar_t* values = reinterpret_cast<const scalar_t*>(raw);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) x[i] = static_cast<float>(values[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        x[i] = i < n ? static_cast<float>(logits[static_cast<int64_t>(v0 + i) * col_stride]) : 0.f;
      }
    }
    // v0 is a multiple of 8: the lane's 8 bits are one byte of one word
    const uint32_t bits = (penalised != nullptr && n > 0) ? penalised[v0 >> 5] >> (v0 & 31) : 0u;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) x[i] = process(x[i], (bits >> i) & 1u);
    return n;
  }
};

template <typename scalar_t>
__device__ __forceinline__ Row<scalar_t> make_row(const scalar_t* logits, const uint32_t* bitmap,
                                                  const Settings& s, int64_t b) {
  return Row<scalar_t>{logits + b * s.row_stride, s.col_stride, s.vocab, s.vectorised,
                       bitmap != nullptr ? bitmap + b * s.bitmap_words : nullptr, s.penalty,
                       s.temperature};
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// ------------------------------------------------------------------ launches 1 and 2

__global__ void mark_penalised_kernel(const int64_t* __restrict__ prev_tokens, int64_t prev_len,
                                      int vocab, int words, uint32_t* __restrict__ bitmap) {
  const int64_t b = blockIdx.y;
  const int64_t* ids = prev_tokens + b * prev_len;
  uint32_t* bits = bitmap + b * words;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < prev_len;
       j += step) {
    const int64_t id = ids[j];  // -1 pads and ids >= V are ignored
    if (id >= 0 && id < vocab) atomicOr(&bits[id >> 5], 1u << (id & 31));
  }
}

// Per tile: its max and sum exp(x - max) (0 when the max is -inf), 4 tiles per warp loaded at
// once. [B, tiles] each.
// (The 4: without it ptxas capped this kernel at 48 registers and spilled.)
template <typename scalar_t>
__global__ void __launch_bounds__(kStatsWarps * 32, 4)
tile_stats_kernel(const scalar_t* __restrict__ logits, const uint32_t* __restrict__ bitmap,
                  const Settings s, float* __restrict__ tile_max, float* __restrict__ tile_sum) {
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Row<scalar_t> row = make_row(logits, bitmap, s, b);
  const int first = (blockIdx.x * kStatsWarps + warp) * kTilesPerWarp;
  float x[kTilesPerWarp][kPerLane];
  int n[kTilesPerWarp];
#pragma unroll
  for (int j = 0; j < kTilesPerWarp; ++j) {
    n[j] = first + j < s.num_tiles ? row.load(first + j, lane, x[j]) : 0;
  }
#pragma unroll
  for (int j = 0; j < kTilesPerWarp; ++j) {
    if (first + j >= s.num_tiles) break;  // the same in the whole warp
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (i < n[j]) mx = fmaxf(mx, x[j][i]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        if (i < n[j]) sum += expf(x[j][i] - mx);
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      tile_max[b * s.num_tiles + first + j] = mx;
      tile_sum[b * s.num_tiles + first + j] = sum;
    }
  }
}

// ------------------------------------------------------------------ the row kernel's parts

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

// Inclusive prefix sum of one value per thread over the block; *exclusive gets the sum before
// this thread, *total the block's sum.
__device__ float block_scan(float w, float* warp_sums /* kWarps */, float* exclusive,
                            float* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float x = w;
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  float before = __shfl_up_sync(kFull, x, 1);
  if (lane == 0) before = 0.f;
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
  __syncthreads();  // warp_sums is rewritten by the next call
  *exclusive = offset + before;
  return offset + x;
}

// f(position, tile, x, n) for every listed tile (list nullptr: tiles 0 .. count - 1), a warp
// per tile, kUnroll tiles loaded per warp before any is used. All lanes of a warp call f
// together (it may shuffle); the assignment of ids to threads is fixed, so sums are too.
template <class RowT, class F>
__device__ __forceinline__ void for_each_tile(const RowT& row, const int* list, int count, F&& f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int base = warp; base < count; base += kUnroll * kWarps) {
    float x[kUnroll][kPerLane];
    int n[kUnroll], tile[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int pos = base + u * kWarps;
      tile[u] = pos < count ? (list != nullptr ? list[pos] : pos) : 0;
      n[u] = pos < count ? row.load(tile[u], lane, x[u]) : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kWarps < count) f(base + u * kWarps, tile[u], x[u], n[u]);
    }
  }
}

// The k-th largest (with multiplicity) of the values visit(fn) passes to fn in every thread,
// 4 passes of 8-bit digits; the values must number at least k.
template <class Visit>
__device__ float kth_largest(Visit&& visit, int k, uint32_t* hist /* 256 */, uint32_t* state) {
  uint32_t prefix = 0, mask = 0, remaining = static_cast<uint32_t>(k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0u;
    __syncthreads();
    visit([&](float x) {
      const uint32_t key = order_key(x);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
    });
    __syncthreads();
    if (threadIdx.x == 0) {  // 256 steps at most
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
  return key_value(prefix);
}

// Writes the tiles whose max is >= low to list, in tile order; returns how many.
__device__ int list_tiles(const float* tile_max, int num_tiles, float low, int* list,
                          int* warp_counts /* kWarps */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int count = 0;
  for (int base = 0; base < num_tiles; base += kThreads) {
    const int t = base + threadIdx.x;
    const bool take = t < num_tiles && !(tile_max[t] < low);
    const unsigned ballot = __ballot_sync(kFull, take);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_counts[w];
      before += w < warp ? c : 0;
      total += c;
    }
    if (take) list[count + before + __popc(ballot & ((1u << lane) - 1u))] = t;
    count += total;
    __syncthreads();  // warp_counts is rewritten next round; list is read after this
  }
  return count;
}

// The smallest kept value under top-p among the values visit passes (those >= top-k's
// threshold), 8 passes.
template <class Visit>
__device__ float top_p_threshold(Visit&& visit, float m, float top_p,
                                 float* counters /* kBuckets x kThreads */, float* bucket_mass,
                                 uint32_t* state, float* fstate /* 3 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* mine = counters + threadIdx.x;  // column threadIdx.x: conflict-free, one owner
  uint32_t prefix = 0, mask = 0;
  for (int shift = 32 - kTopPBits; shift >= 0; shift -= kTopPBits) {
    for (int d = 0; d < kBuckets; ++d) mine[d * kThreads] = 0.f;
    visit([&](float x) {
      const uint32_t key = order_key(x);
      if ((key & mask) == prefix) mine[((key >> shift) & (kBuckets - 1)) * kThreads] += expf(x - m);
    });
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
  return key_value(prefix);
}

// The sum of weight(0 .. count - 1), chunk by chunk in the order find_crossing adds them.
template <class Weight>
__device__ float scan_total(Weight&& weight, int count, float* warp_sums) {
  float running = 0.f;
  for (int base = 0; base < count; base += kThreads) {
    const int j = base + threadIdx.x;
    float exclusive, chunk_total;
    block_scan(j < count ? weight(j) : 0.f, warp_sums, &exclusive, &chunk_total);
    running += chunk_total;
  }
  return running;
}

// The first position j < count (in order) with weight(j) > 0 whose running sum of weights
// exceeds target (*crossed true, *before = the sum before it), else the last position with a
// positive weight (*crossed false; -1 if none). target >= total (scan_total's): the last,
// without searching (u rounded to 1 must give the last kept id).
template <class Weight>
__device__ int find_crossing(Weight&& weight, int count, float target, float total,
                             float* warp_sums, int* first_hit, int* last_pos, float* before,
                             bool* crossed) {
  if (threadIdx.x == 0) {
    *first_hit = INT_MAX;
    *last_pos = -1;
  }
  __syncthreads();
  float running = 0.f;  // the same in every thread
  int my_last = -1;
  const bool search = target < total;
  for (int base = 0; base < count; base += kThreads) {
    const int j = base + threadIdx.x;
    const float w = j < count ? weight(j) : 0.f;
    if (w > 0.f) my_last = j;
    if (!search) continue;
    float exclusive, chunk_total;
    const float inclusive = block_scan(w, warp_sums, &exclusive, &chunk_total);
    const bool hit = w > 0.f && running + inclusive > target;
    if (__syncthreads_or(hit)) {
      if (hit) atomicMin(first_hit, j);
      __syncthreads();
      const int found = *first_hit;
      if (j == found) *before = running + exclusive;
      __syncthreads();
      *crossed = true;
      return found;
    }
    running += chunk_total;
  }
  atomicMax(last_pos, my_last);
  __syncthreads();
  *crossed = false;
  return *last_pos;
}

// One warp: the token inside tile `tile` (module comment, "The draw"); -1 if it holds no
// positive weight.
template <class RowT>
__device__ int draw_in_tile(const RowT& row, int tile, float threshold, float m, float target,
                            float before, bool crossed) {
  const int lane = threadIdx.x & 31;
  float x[kPerLane], running[kPerLane];
  const int n = row.load(tile, lane, x);
  bool positive[kPerLane];
  float mine = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const float w = (i < n && x[i] >= threshold) ? expf(x[i] - m) : 0.f;
    positive[i] = w > 0.f;
    mine += w;
    running[i] = mine;
  }
  float scan = mine;  // inclusive over the lanes
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(kFull, scan, o);
    if (lane >= o) scan += y;
  }
  float lane_before = __shfl_up_sync(kFull, scan, 1);
  if (lane == 0) lane_before = 0.f;
  int first = -1, last = -1;
#pragma unroll
  for (int i = kPerLane - 1; i >= 0; --i) {
    if (positive[i] && before + (lane_before + running[i]) > target) first = i;
    if (positive[i] && last < 0) last = i;
  }
  if (!crossed) first = -1;
  const unsigned firsts = __ballot_sync(kFull, first >= 0);
  if (firsts != 0) {
    const int src = __ffs(firsts) - 1;
    return tile * kTile + src * kPerLane + __shfl_sync(kFull, first, src);
  }
  const unsigned lasts = __ballot_sync(kFull, last >= 0);
  if (lasts == 0) return -1;
  const int src = 31 - __clz(lasts);
  return tile * kTile + src * kPerLane + __shfl_sync(kFull, last, src);
}

// ------------------------------------------------------------------ launch 3

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1)
sample_rows_kernel(const scalar_t* __restrict__ logits, const uint32_t* __restrict__ bitmap,
                   const float* __restrict__ tile_max_all, const float* __restrict__ tile_sum_all,
                   float* tile_kept_all, int* tile_list_all, const float* __restrict__ uniform,
                   const Settings s, int64_t* __restrict__ tokens, float* __restrict__ logprobs,
                   float* __restrict__ thresholds) {
  extern __shared__ float dynamic_smem[];  // top-k: values >= L; then top-p: counters
  __shared__ uint32_t hist[256];
  __shared__ uint32_t state[2];
  __shared__ float fstate[3];
  __shared__ float scratch[kWarps + 1];
  __shared__ float bucket_mass[kBuckets];
  __shared__ int warp_counts[kWarps];
  __shared__ int held, first_hit, last_pos;
  __shared__ float before_hit;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_tiles = s.num_tiles;
  const float* tile_max = tile_max_all + b * num_tiles;
  const float* tile_sum = tile_sum_all + b * num_tiles;
  float* tile_kept = tile_kept_all + b * num_tiles;  // by position in the tile list
  const Row<scalar_t> row = make_row(logits, bitmap, s, b);

  float m = -INFINITY;
  for (int t = threadIdx.x; t < num_tiles; t += kThreads) m = fmaxf(m, tile_max[t]);
  m = block_reduce<true>(m, scratch);

  const int* list = nullptr;  // the tiles that may hold kept ids: all without top-k
  int count = num_tiles;
  float k_floor = -INFINITY;
  if (s.top_k > 0) {
    float low = -INFINITY;  // L: <= the k-th largest value
    if (num_tiles >= s.top_k) {
      low = kth_largest(
          [&](auto fn) {
            for (int t = threadIdx.x; t < num_tiles; t += kThreads) fn(tile_max[t]);
          },
          s.top_k, hist, state);
      int* tile_list = tile_list_all + b * num_tiles;
      count = list_tiles(tile_max, num_tiles, low, tile_list, warp_counts);
      list = tile_list;
    }
    float* values = dynamic_smem;  // [kMaxHeld]
    if (threadIdx.x == 0) held = 0;
    __syncthreads();
    for_each_tile(row, list, count, [&](int, int, const float(&x)[kPerLane], int n) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const bool take = i < n && !(x[i] < low);
        const unsigned ballot = __ballot_sync(kFull, take);
        if (ballot == 0) continue;
        int at = 0;
        if (lane == 0) at = atomicAdd(&held, __popc(ballot));
        at = __shfl_sync(kFull, at, 0) + __popc(ballot & ((1u << lane) - 1u));
        if (take && at < kMaxHeld) values[at] = x[i];
      }
    });
    __syncthreads();
    const int num_held = held;
    if (num_held <= kMaxHeld) {  // the order of `values` varies; integer counts do not care
      k_floor = kth_largest(
          [&](auto fn) {
            for (int i = threadIdx.x; i < num_held; i += kThreads) fn(values[i]);
          },
          s.top_k, hist, state);
    } else {
      k_floor = kth_largest(
          [&](auto fn) {
            for_each_tile(row, list, count, [&](int, int, const float(&x)[kPerLane], int n) {
#pragma unroll
              for (int i = 0; i < kPerLane; ++i) {
                if (i < n && !(x[i] < low)) fn(x[i]);
              }
            });
          },
          s.top_k, hist, state);
    }
  }
  float threshold = k_floor;
  if (s.top_p_on) {  // the counters reuse `values`: kth_largest ended with __syncthreads
    threshold = top_p_threshold(
        [&](auto fn) {
          for_each_tile(row, list, count, [&](int, int, const float(&x)[kPerLane], int n) {
#pragma unroll
            for (int i = 0; i < kPerLane; ++i) {
              if (i < n && x[i] >= k_floor) fn(x[i]);  // removed by top-k otherwise
            }
          });
        },
        m, s.top_p, dynamic_smem, bucket_mass, state, fstate);
  }
  if (thresholds != nullptr && threadIdx.x == 0) thresholds[b] = threshold;
  if (uniform == nullptr) return;

  const bool truncated = s.top_k > 0 || s.top_p_on;
  if (truncated) {  // the kept mass of every listed tile
    for_each_tile(row, list, count, [&](int pos, int, const float(&x)[kPerLane], int n) {
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        if (i < n && x[i] >= threshold) sum += expf(x[i] - m);
      }
      sum = warp_sum(sum);
      if (lane == 0) tile_kept[pos] = sum;
    });
    __syncthreads();
  }
  const auto weight = [&](int j) -> float {
    if (truncated) return tile_kept[j];
    const float sum = tile_sum[j];
    return sum > 0.f ? expf(tile_max[j] - m) * sum : 0.f;
  };
  const float total = scan_total(weight, count, scratch);
  const float target = uniform[b] * total;
  bool crossed;
  const int pos = find_crossing(weight, count, target, total, scratch, &first_hit, &last_pos,
                                &before_hit, &crossed);
  if (warp != 0) return;
  int token = -1;
  if (pos >= 0) {
    const int tile = list != nullptr ? list[pos] : pos;
    token = draw_in_tile(row, tile, threshold, m, target, crossed ? before_hit : 0.f, crossed);
  }
  if (lane == 0) {
    const int safe = token < 0 ? 0 : token;  // only for a row without a positive weight
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
  TORCH_CHECK(vocab > 0 && vocab <= INT_MAX - kTile, "vocabulary size must be in [1, 2^31 - 257]");
  TORCH_CHECK(batch <= 65535, "at most 65535 rows per call, got ", batch);
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
  const auto f32 = logits.options().dtype(at::kFloat);
  auto tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({batch}, f32);
  at::Tensor thresholds;
  if (want_thresholds) thresholds = at::empty({batch}, f32);
  if (batch == 0) return {tokens, logprobs, thresholds};

  Settings s;
  s.vocab = static_cast<int>(vocab);
  s.num_tiles = static_cast<int>((vocab + kTile - 1) / kTile);
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
  // 16-byte loads need 16-byte aligned rows (lane slices are 8 ids, >= 16 bytes, from there)
  s.vectorised = s.col_stride == 1 &&
                 (batch == 1 || (s.row_stride * logits.element_size()) % 16 == 0) &&
                 reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;

  // Workspace, sized by the shapes only: tile max, tile sum, kept mass per listed tile.
  auto tile_stats = at::empty({3, batch, s.num_tiles}, f32);
  at::Tensor tile_list, bitmap;
  if (s.top_k > 0) tile_list = at::empty({batch, s.num_tiles}, logits.options().dtype(at::kInt));
  if (s.bitmap_words > 0) bitmap = at::zeros({batch, s.bitmap_words}, f32.dtype(at::kInt));
  const uint32_t* bits =
      s.bitmap_words > 0 ? reinterpret_cast<const uint32_t*>(bitmap.data_ptr<int>()) : nullptr;
  float* stats = tile_stats.data_ptr<float>();
  const int64_t plane = batch * s.num_tiles;
  const size_t dynamic_bytes = sizeof(float) * std::max(s.top_p_on ? kTopPCounters : 0,
                                                        s.top_k > 0 ? kMaxHeld : 0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (s.bitmap_words > 0) {
    const int64_t blocks = std::min<int64_t>((s.prev_len + 255) / 256, 64);
    mark_penalised_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(batch)),
                            256, 0, stream>>>(prev.data_ptr<int64_t>(), s.prev_len, s.vocab,
                                              s.bitmap_words,
                                              reinterpret_cast<uint32_t*>(bitmap.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "r2ec_sample",
                                  [&] {
    const scalar_t* data = logits.data_ptr<scalar_t>();
    const unsigned stats_blocks = (s.num_tiles + kTilesPerStatsBlock - 1) / kTilesPerStatsBlock;
    tile_stats_kernel<scalar_t><<<dim3(stats_blocks, static_cast<unsigned>(batch)),
                                  kStatsWarps * 32, 0, stream>>>(data, bits, s, stats,
                                                                 stats + plane);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const auto kernel = &sample_rows_kernel<scalar_t>;
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          logits.get_device()));
    TORCH_CHECK(attributes.sharedSizeBytes + dynamic_bytes <= static_cast<size_t>(optin),
                "the sampling kernel needs ", attributes.sharedSizeBytes + dynamic_bytes,
                " bytes of shared memory per block, the device allows ", optin);
    if (attributes.sharedSizeBytes + dynamic_bytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(dynamic_bytes)));
    }
    kernel<<<static_cast<unsigned>(batch), kThreads, dynamic_bytes, stream>>>(
        data, bits, stats, stats + plane, stats + 2 * plane,
        s.top_k > 0 ? tile_list.data_ptr<int>() : nullptr,
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
