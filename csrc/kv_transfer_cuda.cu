// CUDA gather/scatter between paged KV blocks (device memory) and the LMCache slot image
// (layout in kv_transfer.h). C ABI over raw pointers and a caller-given cudaStream_t; cudart is
// linked statically so the library does not depend on the CUDA libraries torch ships.
//
// Host side of a transfer (the SHM pool registered with cudaHostRegister), two ways:
//   staged:    SM kernel gathers into a device staging buffer, then ONE cudaMemcpyAsync (copy
//              engine) moves the slot; retrieve does the reverse (H2D copy, then scatter kernel).
//   zero-copy: the SM kernel reads/writes the mapped host pages directly over PCIe.
// The caller picks by passing a staging pointer or not. The Python front door defaults to staged
// in both directions (see DEFAULT_CUDA_COPY in kvconn_plugin/ops/_native.py for the reasoning):
// SM zero-copy reads of host memory are far slower than the copy engine over PCIe, and staged
// keeps SMs busy only for the short D2D pass instead of for the whole PCIe transfer.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <string>

#include "kv_transfer.h"
#include "kv_transfer_check.h"

#define KVC_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

thread_local std::string g_last_error;

// Layer bases and block ids travel inside the kernel parameters (4 KiB limit), so a transfer
// needs no device-side index arrays and no extra H2D copy. Bigger calls are split into launches.
constexpr int kMaxLayersPerLaunch = 128;
constexpr int kMaxIdsPerLaunch = 448;
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread

struct LaunchArgs {
  KVGeometry g;
  int64_t tokens_in_slot;  // T
  uint8_t* slot;           // device-accessible slot image (staging or mapped host)
  int32_t first_layer;
  int32_t n_layers;
  int32_t first_block;     // chunk position of ids[0]
  int32_t n_ids;
  uint64_t bases[kMaxLayersPerLaunch];
  int32_t ids[kMaxIdsPerLaunch];
};
static_assert(sizeof(LaunchArgs) <= 4000, "kernel parameters must stay under 4 KiB");

int fail(int code, const char* what) {
  g_last_error = what;
  return code;
}

int fail_cuda(cudaError_t e, const char* what) {
  char buf[320];
  snprintf(buf, sizeof buf, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
  cudaGetLastError();  // clear non-sticky errors so the next call starts clean
  return fail(KVC_ECUDA, buf);
}

// One CTA handles one (plane, layer, block) task at a time: block_size*H runs of R bytes, read
// as R/W vectors. Slot side is contiguous inside a task, so stores are fully coalesced.
// __host__ too, so kvc_cuda_host_emulate can run the very same code on a machine without a GPU.
template <typename VT, bool kToSlot>
__host__ __device__ __forceinline__ void copy_task(const LaunchArgs& a, int64_t task,
                                                   uint32_t tid, uint32_t nthreads) {
  constexpr uint32_t W = sizeof(VT);
  const KVGeometry& g = a.g;
  const uint32_t vec_per_run = (uint32_t)(g.run_bytes / W);
  const uint32_t vec_per_token = vec_per_run * (uint32_t)g.num_heads;
  const uint32_t vec_per_task = vec_per_token * (uint32_t)g.block_size;
  const int64_t token_bytes = g.run_bytes * g.num_heads;

  const int32_t jj = (int32_t)(task % a.n_ids);
  const int32_t pl_local = (int32_t)(task / a.n_ids);
  const int32_t layer_local = pl_local % a.n_layers;
  const int32_t plane = pl_local / a.n_layers;
  const int64_t pl = (int64_t)plane * g.num_layers + a.first_layer + layer_local;
  uint8_t* paged = reinterpret_cast<uint8_t*>(a.bases[layer_local]) +
                   (int64_t)a.ids[jj] * g.block_stride + plane * g.plane_stride;
  uint8_t* slot = a.slot + (pl * a.tokens_in_slot +
                            (int64_t)(a.first_block + jj) * g.block_size) * token_bytes;

  for (uint32_t first = tid; first < vec_per_task; first += kUnroll * nthreads) {
    VT v[kUnroll];
    int64_t off[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t i = first + u * nthreads;
      if (i < vec_per_task) {
        const uint32_t s = i / vec_per_token;
        const uint32_t r = i - s * vec_per_token;
        const uint32_t h = r / vec_per_run;
        const uint32_t q = r - h * vec_per_run;
        off[u] = s * g.token_stride + h * g.head_stride + (int64_t)q * W;
        if (kToSlot) {
          v[u] = *reinterpret_cast<const VT*>(paged + off[u]);
        } else {
          v[u] = *reinterpret_cast<const VT*>(slot + (int64_t)i * W);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t i = first + u * nthreads;
      if (i < vec_per_task) {
        if (kToSlot) {
          *reinterpret_cast<VT*>(slot + (int64_t)i * W) = v[u];
        } else {
          *reinterpret_cast<VT*>(paged + off[u]) = v[u];
        }
      }
    }
  }
}

inline int64_t task_count(const LaunchArgs& a) {
  return (int64_t)a.g.num_planes * a.n_layers * a.n_ids;
}

template <typename VT, bool kToSlot>
__global__ void __launch_bounds__(kThreads) kv_copy_kernel(const __grid_constant__ LaunchArgs a) {
  const int64_t tasks = (int64_t)a.g.num_planes * a.n_layers * a.n_ids;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    copy_task<VT, kToSlot>(a, task, threadIdx.x, kThreads);
  }
}

// Where the bytes move: the GPU (async on a stream) or, for tests without a GPU, the host
// running the identical task code sequentially (CTAs and threads share no state, so sequential
// execution is exact).
struct GpuOps {
  cudaStream_t stream;
  cudaError_t copy(void* dst, const void* src, size_t n) const {
    return cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, stream);
  }
  cudaError_t copy_rows(void* dst, const void* src, size_t pitch, size_t width,
                        size_t rows) const {
    return cudaMemcpy2DAsync(dst, pitch, src, pitch, width, rows, cudaMemcpyDefault, stream);
  }
  template <typename VT, bool kToSlot>
  cudaError_t launch(const LaunchArgs& a, int grid) const {
    kv_copy_kernel<VT, kToSlot><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
};

struct HostEmulator {
  cudaError_t copy(void* dst, const void* src, size_t n) const {
    memcpy(dst, src, n);
    return cudaSuccess;
  }
  cudaError_t copy_rows(void* dst, const void* src, size_t pitch, size_t width,
                        size_t rows) const {
    for (size_t r = 0; r < rows; ++r) {
      memcpy(static_cast<uint8_t*>(dst) + r * pitch, static_cast<const uint8_t*>(src) + r * pitch,
             width);
    }
    return cudaSuccess;
  }
  template <typename VT, bool kToSlot>
  cudaError_t launch(const LaunchArgs& a, int grid) const {
    for (int block = 0; block < grid; ++block) {
      for (int64_t task = block; task < task_count(a); task += grid) {
        for (uint32_t t = 0; t < (uint32_t)kThreads; ++t) {
          copy_task<VT, kToSlot>(a, task, t, kThreads);
        }
      }
    }
    return cudaSuccess;
  }
};

// Widest vector that every address in the transfer is aligned to.
int vector_width(const KVGeometry& g, const uint64_t* bases, const void* slot) {
  uint64_t bits = (uint64_t)g.run_bytes | (uint64_t)g.block_stride | (uint64_t)g.head_stride |
                  (uint64_t)g.token_stride | (uint64_t)g.plane_stride |
                  (uint64_t)(uintptr_t)slot;
  for (int32_t l = 0; l < g.num_layers; ++l) bits |= bases[l];
  for (int w = 16; w > 1; w /= 2) {
    if ((bits & (uint64_t)(w - 1)) == 0) return w;
  }
  return 1;
}

template <bool kToSlot, typename Ops>
cudaError_t launch_one(const Ops& ops, const LaunchArgs& a, int width, int max_ctas) {
  const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(task_count(a), max_ctas));
  switch (width) {
    case 16: return ops.template launch<uint4, kToSlot>(a, grid);
    case 8: return ops.template launch<uint2, kToSlot>(a, grid);
    case 4: return ops.template launch<uint32_t, kToSlot>(a, grid);
    case 2: return ops.template launch<uint16_t, kToSlot>(a, grid);
    default: return ops.template launch<uint8_t, kToSlot>(a, grid);
  }
}

// Launches over (layer group) x (id batch); first_block..n_ids are the chunk positions moved.
template <bool kToSlot, typename Ops>
int launch_all(const Ops& ops, const KVGeometry& g, const uint64_t* bases, const int64_t* ids,
               int64_t n_ids, int64_t first_block, uint8_t* slot_dev, int max_ctas) {
  LaunchArgs a;
  memset(&a, 0, sizeof a);
  a.g = g;
  a.tokens_in_slot = n_ids * g.block_size;
  a.slot = slot_dev;
  const int width = vector_width(g, bases, slot_dev);
  for (int32_t l0 = 0; l0 < g.num_layers; l0 += kMaxLayersPerLaunch) {
    a.first_layer = l0;
    a.n_layers = std::min(kMaxLayersPerLaunch, g.num_layers - l0);
    for (int32_t l = 0; l < a.n_layers; ++l) a.bases[l] = bases[l0 + l];
    for (int64_t j0 = first_block; j0 < n_ids; j0 += kMaxIdsPerLaunch) {
      a.first_block = (int32_t)j0;
      a.n_ids = (int32_t)std::min<int64_t>(kMaxIdsPerLaunch, n_ids - j0);
      for (int32_t k = 0; k < a.n_ids; ++k) a.ids[k] = (int32_t)ids[j0 + k];
      cudaError_t e = launch_one<kToSlot>(ops, a, width, max_ctas);
      if (e != cudaSuccess) return fail_cuda(e, "kernel launch failed");
    }
  }
  return KVC_OK;
}

// Resolves where the slot lives. Device memory must be on `device`; pinned or registered host
// memory is translated to its device alias for zero-copy; pageable memory only works staged.
int resolve_slot(void* slot, int device, bool staged, uint8_t** dev_alias) {
  cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, slot);
  if (e != cudaSuccess) return fail_cuda(e, "cudaPointerGetAttributes(slot)");
  *dev_alias = nullptr;
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) {
    if (attr.device != device) return fail(KVC_EINVAL, "slot is device memory of another GPU");
    *dev_alias = static_cast<uint8_t*>(slot);
    return KVC_OK;
  }
  if (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr) {
    *dev_alias = static_cast<uint8_t*>(attr.devicePointer);
    return KVC_OK;
  }
  if (!staged) {
    return fail(KVC_ENOTSUP, "zero-copy needs pinned or cudaHostRegister'ed host memory");
  }
  return KVC_OK;  // pageable host memory: fine for the staged path (cudaMemcpyAsync syncs)
}

int check_staging(void* staging, int device) {
  cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, staging);
  if (e != cudaSuccess) return fail_cuda(e, "cudaPointerGetAttributes(staging)");
  if (attr.type != cudaMemoryTypeDevice || attr.device != device) {
    return fail(KVC_EINVAL, "staging buffer must be device memory on the KV cache's GPU");
  }
  return KVC_OK;
}

bool fits_32bit_indexing(const KVGeometry& g, int64_t n_ids) {
  return g.num_blocks <= INT32_MAX && n_ids * g.block_size <= INT32_MAX &&
         g.run_bytes * g.num_heads * g.block_size <= INT32_MAX;
}

int prepare(const KVGeometry* g, const uint64_t* bases, const int64_t* ids, int64_t n_ids,
            int64_t skip, void* slot, int device, int64_t* slot_bytes) {
  char err[256];
  if (!kvconn::check_transfer_args(g, bases, ids, n_ids, skip, slot, slot_bytes, err,
                                   sizeof err)) {
    return fail(KVC_EINVAL, err);
  }
  if (!fits_32bit_indexing(*g, n_ids)) {
    return fail(KVC_EINVAL, "geometry too large for 32-bit in-kernel indexing");
  }
  cudaError_t e = cudaSetDevice(device);  // our static runtime keeps its own current device
  if (e != cudaSuccess) return fail_cuda(e, "cudaSetDevice");
  return KVC_OK;
}

}  // namespace

KVC_EXPORT int kvc_cuda_abi_version() { return KVC_ABI_VERSION; }

KVC_EXPORT const char* kvc_cuda_last_error() { return g_last_error.c_str(); }

KVC_EXPORT int kvc_cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

KVC_EXPORT int kvc_cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

// 0 if `ptr` is device memory on `device`, else KVC_EINVAL with a message (checked once per
// layer when a transfer object is bound, not per call).
KVC_EXPORT int kvc_cuda_check_device_ptr(const void* ptr, int device) {
  cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
  if (e != cudaSuccess) return fail_cuda(e, "cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice || attr.device != device) {
    return fail(KVC_EINVAL, "pointer is not device memory of the expected GPU");
  }
  return KVC_OK;
}

// 1 if host memory at `ptr` is page-locked AND mapped into the device address space, i.e.
// usable by a zero-copy kernel; else 0. Memory registered without cudaHostRegisterMapped by
// someone else can be pinned yet have no device alias: callers then take the staged path.
KVC_EXPORT int kvc_cuda_is_mapped_host(const void* ptr) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr ? 1 : 0;
}

// Pins an existing host range (e.g. the server's SHM pool). 0 = newly registered,
// 1 = already registered, <0 = error.
KVC_EXPORT int kvc_cuda_host_register(void* ptr, int64_t nbytes) {
  if (ptr == nullptr || nbytes <= 0) return fail(KVC_EINVAL, "null pointer or empty range");
  cudaError_t e = cudaHostRegister(ptr, (size_t)nbytes,
                                   cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (e == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();
    return 1;
  }
  if (e != cudaSuccess) return fail_cuda(e, "cudaHostRegister");
  return KVC_OK;
}

KVC_EXPORT int kvc_cuda_host_unregister(void* ptr) {
  cudaError_t e = cudaHostUnregister(ptr);
  if (e != cudaSuccess) return fail_cuda(e, "cudaHostUnregister");
  return KVC_OK;
}

KVC_EXPORT int kvc_cuda_stream_synchronize(void* stream) {
  cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) return fail_cuda(e, "cudaStreamSynchronize");
  return KVC_OK;
}

namespace {

// Shared bodies of the real entry points and the host emulator. `slot_kernel` is the slot as the
// kernel sees it (device pointer or mapped-host alias); `slot` is the raw pointer for copies.
template <typename Ops>
int run_gather(const Ops& ops, const KVGeometry& g, const uint64_t* bases, const int64_t* ids,
               int64_t n_ids, void* slot, uint8_t* slot_kernel, void* staging, int64_t bytes,
               int max_ctas) {
  if (staging == nullptr) {
    return launch_all<true>(ops, g, bases, ids, n_ids, 0, slot_kernel, max_ctas);
  }
  int rc = launch_all<true>(ops, g, bases, ids, n_ids, 0, static_cast<uint8_t*>(staging), max_ctas);
  if (rc != KVC_OK) return rc;
  cudaError_t e = ops.copy(slot, staging, (size_t)bytes);
  return e == cudaSuccess ? KVC_OK : fail_cuda(e, "async copy staging -> slot");
}

// Staged scatter copies only the non-skipped token range of each (plane, layer) row.
template <typename Ops>
int run_scatter(const Ops& ops, const KVGeometry& g, const uint64_t* bases, const int64_t* ids,
                int64_t n_ids, int64_t skip, const void* slot, uint8_t* slot_kernel,
                void* staging, int64_t bytes, int max_ctas) {
  if (staging == nullptr) {
    return launch_all<false>(ops, g, bases, ids, n_ids, skip, slot_kernel, max_ctas);
  }
  const int64_t rows = (int64_t)g.num_planes * g.num_layers;
  const int64_t pitch = bytes / rows;  // one (plane, layer) row of the slot
  const int64_t skip_bytes = skip * g.block_size * g.run_bytes * g.num_heads;
  uint8_t* stage = static_cast<uint8_t*>(staging);
  cudaError_t e = skip == 0
      ? ops.copy(stage, slot, (size_t)bytes)
      : ops.copy_rows(stage + skip_bytes, static_cast<const uint8_t*>(slot) + skip_bytes,
                      (size_t)pitch, (size_t)(pitch - skip_bytes), (size_t)rows);
  if (e != cudaSuccess) return fail_cuda(e, "async copy slot -> staging");
  return launch_all<false>(ops, g, bases, ids, n_ids, skip, stage, max_ctas);
}

}  // namespace

// Paged blocks -> slot. With `staging` (device, >= slot bytes): kernel into staging, then one
// async copy to `slot`. Without: the kernel writes `slot` directly (device or mapped host).
// Everything is queued on `stream`; nothing waits for completion.
KVC_EXPORT int kvc_cuda_gather(const KVGeometry* g, const uint64_t* layer_bases,
                               const int64_t* block_ids, int64_t n_ids, void* slot,
                               void* staging, int device, int max_ctas, void* stream) {
  int64_t bytes = 0;
  int rc = prepare(g, layer_bases, block_ids, n_ids, 0, slot, device, &bytes);
  if (rc != KVC_OK || bytes == 0) return rc;
  if (max_ctas < 1) return fail(KVC_EINVAL, "max_ctas must be >= 1");
  uint8_t* slot_kernel = nullptr;
  if ((rc = resolve_slot(slot, device, staging != nullptr, &slot_kernel)) != KVC_OK) return rc;
  if (staging != nullptr && (rc = check_staging(staging, device)) != KVC_OK) return rc;
  return run_gather(GpuOps{static_cast<cudaStream_t>(stream)}, *g, layer_bases, block_ids,
                    n_ids, slot, slot_kernel, staging, bytes, max_ctas);
}

// Slot -> paged blocks block_ids[skip_blocks:]; leading blocks are never written.
KVC_EXPORT int kvc_cuda_scatter(const KVGeometry* g, const uint64_t* layer_bases,
                                const int64_t* block_ids, int64_t n_ids, int64_t skip_blocks,
                                const void* slot, void* staging, int device, int max_ctas,
                                void* stream) {
  int64_t bytes = 0;
  void* slot_mut = const_cast<void*>(slot);
  int rc = prepare(g, layer_bases, block_ids, n_ids, skip_blocks, slot_mut, device, &bytes);
  if (rc != KVC_OK || bytes == 0 || skip_blocks == n_ids) return rc;
  if (max_ctas < 1) return fail(KVC_EINVAL, "max_ctas must be >= 1");
  uint8_t* slot_kernel = nullptr;
  if ((rc = resolve_slot(slot_mut, device, staging != nullptr, &slot_kernel)) != KVC_OK) return rc;
  if (staging != nullptr && (rc = check_staging(staging, device)) != KVC_OK) return rc;
  return run_scatter(GpuOps{static_cast<cudaStream_t>(stream)}, *g, layer_bases, block_ids,
                     n_ids, skip_blocks, slot, slot_kernel, staging, bytes, max_ctas);
}

// Test hook: runs the device code path (launch splitting, vector width choice, kernel index
// math, staged copies) on the HOST with host pointers, sequentially. Needs no GPU or driver,
// so CPU-only CI can check the CUDA kernels' logic byte for byte. `gather` != 0 gathers.
KVC_EXPORT int kvc_cuda_host_emulate(int gather, const KVGeometry* g,
                                     const uint64_t* layer_bases, const int64_t* block_ids,
                                     int64_t n_ids, int64_t skip_blocks, void* slot,
                                     void* staging, int max_ctas) {
  char err[256];
  int64_t bytes = 0;
  if (!kvconn::check_transfer_args(g, layer_bases, block_ids, n_ids, gather ? 0 : skip_blocks,
                                   slot, &bytes, err, sizeof err)) {
    return fail(KVC_EINVAL, err);
  }
  if (!fits_32bit_indexing(*g, n_ids)) {
    return fail(KVC_EINVAL, "geometry too large for 32-bit in-kernel indexing");
  }
  if (bytes == 0 || (!gather && skip_blocks == n_ids)) return KVC_OK;
  if (max_ctas < 1) return fail(KVC_EINVAL, "max_ctas must be >= 1");
  uint8_t* direct = static_cast<uint8_t*>(slot);
  if (gather) {
    return run_gather(HostEmulator{}, *g, layer_bases, block_ids, n_ids, slot, direct, staging,
                      bytes, max_ctas);
  }
  return run_scatter(HostEmulator{}, *g, layer_bases, block_ids, n_ids, skip_blocks, slot,
                     direct, staging, bytes, max_ctas);
}
