// C ABI shared by libkvconn_cpu.so and libkvconn_cuda.so.
//
// Plain C structs and functions over raw pointers, so the libraries never link libtorch and
// survive torch upgrades. kvconn_plugin/ops/_native.py mirrors KVGeometry with ctypes; bump
// KVC_ABI_VERSION whenever the struct or a signature changes.
//
// Slot image (what LMCache stores for one chunk), C-contiguous bytes:
//   [P planes][L layers][T tokens][H heads][R bytes],  T = n_ids * block_size,
//   token t = j * block_size + s  (j: position in the chunk's block list, s: slot in block).
// Paged source of run (p, l, block b, h, s):
//   layer_bases[l] + b*block_stride + h*head_stride + s*token_stride + p*plane_stride.
#ifndef KVCONN_KV_TRANSFER_H_
#define KVCONN_KV_TRANSFER_H_

#include <stdint.h>

#define KVC_ABI_VERSION 1

// Return codes (negative = rejected before anything was written).
#define KVC_OK 0
#define KVC_EINVAL (-1)      // bad geometry, pointer, count or block id
#define KVC_ECUDA (-2)       // a CUDA runtime call failed
#define KVC_ENOTSUP (-3)     // e.g. zero-copy asked for unmapped host memory

#ifdef __cplusplus
extern "C" {
#endif

typedef struct KVGeometry {
  int32_t abi_version;   // must equal KVC_ABI_VERSION
  int32_t num_layers;    // L
  int32_t num_planes;    // P: 2 (K then V) or 1 (MLA)
  int32_t num_heads;     // H
  int32_t block_size;    // tokens per paged block
  int32_t reserved;      // keeps the int64 fields 8-byte aligned; must be 0
  int64_t num_blocks;    // valid block ids are [0, num_blocks)
  int64_t run_bytes;     // R: contiguous bytes per (plane, token, head)
  int64_t block_stride;  // all strides in bytes, all >= 0
  int64_t head_stride;
  int64_t token_stride;
  int64_t plane_stride;
} KVGeometry;

#ifdef __cplusplus
}
#endif

#endif  // KVCONN_KV_TRANSFER_H_
