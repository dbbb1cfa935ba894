// CPU gather/scatter between paged KV blocks and the LMCache slot image (layout in kv_transfer.h).
//
// Work is split into tasks of one (plane, layer, block); each task copies block_size*H runs of R
// bytes. Runs that touch on both sides are merged (whole block for MLA, all heads of a token when
// head_stride == R), because a memcpy call per 256-byte run costs more than the copy itself.
// Large transfers write the destination with non-temporal (streaming) stores where every run is
// whole, aligned cache lines: a regular store first reads the line it overwrites, so a copy
// costs three memory passes instead of two (glibc's memcpy streams large copies for this reason).
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "kv_transfer.h"
#include "kv_transfer_check.h"

#define KVC_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

thread_local std::string g_last_error;

// Below this many bytes a second thread costs more (spawn ~20 us) than it saves.
constexpr int64_t kMinBytesPerThread = 1 << 20;
constexpr int kMaxThreads = 64;
// Streaming stores pay off once the data cannot stay in cache for a reader anyway.
constexpr int64_t kStreamMinBytes = 2 << 20;
constexpr int64_t kLine = 64;

// Fixed-size copies compile to inline vector moves; most runs are one of these sizes.
template <int64_t N>
inline void copy_fixed(uint8_t* dst, const uint8_t* src) { __builtin_memcpy(dst, src, N); }

using RunCopy = void (*)(uint8_t*, const uint8_t*, int64_t);

template <int64_t N>
void copy_run_fixed(uint8_t* dst, const uint8_t* src, int64_t) { copy_fixed<N>(dst, src); }
void copy_run_any(uint8_t* dst, const uint8_t* src, int64_t n) { memcpy(dst, src, (size_t)n); }

#if defined(__SSE2__)
// n % 64 == 0 and dst 64-byte aligned (the planner checks): whole lines, no read of dst.
void copy_run_stream(uint8_t* dst, const uint8_t* src, int64_t n) {
  for (int64_t i = 0; i < n; i += kLine) {
    // Hints the next lines early; the hardware prefetcher restarts at every page and run.
    // (A prefetch never faults, so running past the end of the run is harmless.)
    __builtin_prefetch(src + i + 512, 0, 0);
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
}
constexpr bool kHaveStreaming = true;
inline void store_fence() { _mm_sfence(); }
#else
void copy_run_stream(uint8_t* dst, const uint8_t* src, int64_t n) { memcpy(dst, src, (size_t)n); }
constexpr bool kHaveStreaming = false;
inline void store_fence() {}
#endif

RunCopy pick_run_copy(int64_t n) {
  switch (n) {
    case 64: return copy_run_fixed<64>;
    case 128: return copy_run_fixed<128>;
    case 256: return copy_run_fixed<256>;
    case 512: return copy_run_fixed<512>;
    case 1024: return copy_run_fixed<1024>;
    default: return copy_run_any;
  }
}

struct Plan {
  const KVGeometry* g;
  const uint64_t* bases;
  const int64_t* ids;
  int64_t n_ids;        // blocks in the chunk (defines T)
  int64_t first_block;  // first chunk position touched (skip_blocks for scatter)
  uint8_t* slot;
  bool to_slot;         // gather (paged -> slot) or scatter (slot -> paged)
  // Merged run shape: `runs_per_token` runs of `run` bytes, source step `src_step`.
  int64_t run;
  int64_t runs_per_token;
  int64_t src_step;
  int64_t tokens_per_task;  // block_size, or 1 when the whole block is one run
  RunCopy copy;
  bool streaming;           // non-temporal stores: fence before returning
};

// True when every destination run starts on a cache line (runs are whole lines).
bool dst_runs_line_aligned(const KVGeometry* g, const uint64_t* bases, const uint8_t* slot,
                           int64_t run, bool to_slot) {
  if (run % kLine != 0) return false;
  if (to_slot) return reinterpret_cast<uintptr_t>(slot) % kLine == 0;  // slot offsets: k*run
  uint64_t bits = (uint64_t)g->block_stride | (uint64_t)g->head_stride |
                  (uint64_t)g->token_stride | (uint64_t)g->plane_stride;
  for (int32_t l = 0; l < g->num_layers; ++l) bits |= bases[l];
  return bits % kLine == 0;
}

Plan make_plan(const KVGeometry* g, const uint64_t* bases, const int64_t* ids, int64_t n_ids,
               int64_t first_block, uint8_t* slot, bool to_slot, int64_t moved_bytes) {
  Plan p{g, bases, ids, n_ids, first_block, slot, to_slot, g->run_bytes, g->num_heads,
         g->head_stride, g->block_size, nullptr, false};
  const int64_t token_bytes = g->run_bytes * g->num_heads;  // slot bytes per token
  if (g->num_heads == 1 || g->head_stride == g->run_bytes) {
    p.run = token_bytes;  // heads are adjacent in the source as in the slot
    p.runs_per_token = 1;
    p.src_step = 0;
    if (g->token_stride == token_bytes) {  // tokens adjacent too: one run per block
      p.run = token_bytes * g->block_size;
      p.tokens_per_task = 1;
    }
  }
  p.copy = pick_run_copy(p.run);
  if (kHaveStreaming && moved_bytes >= kStreamMinBytes &&
      dst_runs_line_aligned(g, bases, slot, p.run, to_slot)) {
    p.copy = copy_run_stream;
    p.streaming = true;
  }
  return p;
}

void run_tasks(const Plan& p, int64_t task_begin, int64_t task_end) {
  const KVGeometry& g = *p.g;
  const int64_t blocks = p.n_ids - p.first_block;
  const int64_t T = p.n_ids * g.block_size;
  const int64_t token_bytes = g.run_bytes * g.num_heads;
  for (int64_t task = task_begin; task < task_end; ++task) {
    // Plane is the fastest-moving task index: K and V of one (layer, block) are copied back to
    // back, so each paged block is read while its neighbouring lines are still streaming in.
    const int64_t plane = task % g.num_planes;
    const int64_t lj = task / g.num_planes;  // layer * blocks + position
    const int64_t j = p.first_block + lj % blocks;
    const int64_t layer = lj / blocks;
    const int64_t pl = plane * g.num_layers + layer;
    uint8_t* paged = reinterpret_cast<uint8_t*>(p.bases[layer]) + p.ids[j] * g.block_stride +
                     plane * g.plane_stride;
    uint8_t* slot = p.slot + (pl * T + j * g.block_size) * token_bytes;
    for (int64_t s = 0; s < p.tokens_per_task; ++s) {
      uint8_t* src_tok = paged + s * g.token_stride;
      uint8_t* slot_tok = slot + s * token_bytes;
      for (int64_t h = 0; h < p.runs_per_token; ++h) {
        uint8_t* a = src_tok + h * p.src_step;
        uint8_t* b = slot_tok + h * p.run;
        if (p.to_slot) p.copy(b, a, p.run); else p.copy(a, b, p.run);
      }
    }
  }
  if (p.streaming) store_fence();  // make streamed lines visible before the caller goes on
}

int transfer(const KVGeometry* g, const uint64_t* bases, const int64_t* ids, int64_t n_ids,
             int64_t skip, void* slot, int num_threads, bool to_slot) {
  char err[256];
  int64_t slot_bytes = 0;
  if (!kvconn::check_transfer_args(g, bases, ids, n_ids, skip, slot, &slot_bytes, err,
                                   sizeof err)) {
    g_last_error = err;
    return KVC_EINVAL;
  }
  const int64_t blocks = n_ids - skip;
  const int64_t tasks = (int64_t)g->num_planes * g->num_layers * blocks;
  if (tasks == 0) return KVC_OK;
  const int64_t moved = slot_bytes / n_ids * blocks;
  const Plan plan = make_plan(g, bases, ids, n_ids, skip, static_cast<uint8_t*>(slot), to_slot,
                              moved);

  int64_t threads = std::min<int64_t>(std::max(num_threads, 1), kMaxThreads);
  threads = std::min(threads, std::max<int64_t>(1, moved / kMinBytesPerThread));
  threads = std::min(threads, tasks);
  if (threads == 1) {
    run_tasks(plan, 0, tasks);
    return KVC_OK;
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  try {
    for (int64_t t = 1; t < threads; ++t) {
      workers.emplace_back(run_tasks, std::cref(plan), tasks * t / threads,
                           tasks * (t + 1) / threads);
    }
  } catch (...) {
    // Could not spawn (resource limits): the calling thread does the rest itself.
  }
  const int64_t spawned = (int64_t)workers.size();
  run_tasks(plan, 0, tasks / threads);
  if (spawned < threads - 1) run_tasks(plan, tasks * (spawned + 1) / threads, tasks);
  for (auto& w : workers) w.join();
  return KVC_OK;
}

}  // namespace

KVC_EXPORT int kvc_abi_version() { return KVC_ABI_VERSION; }

KVC_EXPORT const char* kvc_cpu_last_error() { return g_last_error.c_str(); }

// Paged blocks `block_ids[0:n_ids]` of every layer -> slot image.
KVC_EXPORT int kvc_cpu_gather(const KVGeometry* g, const uint64_t* layer_bases,
                              const int64_t* block_ids, int64_t n_ids, void* slot,
                              int num_threads) {
  return transfer(g, layer_bases, block_ids, n_ids, 0, slot, num_threads, true);
}

// Slot image -> paged blocks `block_ids[skip_blocks:n_ids]` (leading blocks stay untouched).
KVC_EXPORT int kvc_cpu_scatter(const KVGeometry* g, const uint64_t* layer_bases,
                               const int64_t* block_ids, int64_t n_ids, int64_t skip_blocks,
                               const void* slot, int num_threads) {
  return transfer(g, layer_bases, block_ids, n_ids, skip_blocks, const_cast<void*>(slot),
                  num_threads, false);
}
