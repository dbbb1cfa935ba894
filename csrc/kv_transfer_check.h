// Host-side argument checks shared by the CPU and CUDA libraries. Every call is checked in full
// before the first byte moves, so a rejected call never leaves a half-written destination.
#ifndef KVCONN_KV_TRANSFER_CHECK_H_
#define KVCONN_KV_TRANSFER_CHECK_H_

#include <stdint.h>
#include <stdio.h>

#include "kv_transfer.h"

namespace kvconn {

// Writes a message into `err` (size n) and returns false when the call must be rejected.
// `skip_blocks` is 0 for gathers. `slot_bytes` receives P*L*n_ids*block_size*H*R.
inline bool check_transfer_args(const KVGeometry* g, const uint64_t* layer_bases,
                                const int64_t* block_ids, int64_t n_ids, int64_t skip_blocks,
                                const void* slot, int64_t* slot_bytes, char* err, size_t n) {
  if (g == nullptr) { snprintf(err, n, "geometry pointer is null"); return false; }
  if (g->abi_version != KVC_ABI_VERSION) {
    snprintf(err, n, "geometry ABI version %d, library expects %d", g->abi_version,
             KVC_ABI_VERSION);
    return false;
  }
  if (g->num_layers < 1 || g->num_heads < 1 || g->block_size < 1 || g->num_blocks < 1 ||
      g->run_bytes < 1 || (g->num_planes != 1 && g->num_planes != 2) || g->reserved != 0) {
    snprintf(err, n, "invalid geometry (L=%d P=%d H=%d block_size=%d blocks=%lld run=%lld)",
             g->num_layers, g->num_planes, g->num_heads, g->block_size,
             (long long)g->num_blocks, (long long)g->run_bytes);
    return false;
  }
  if (g->block_stride < 0 || g->head_stride < 0 || g->token_stride < 0 || g->plane_stride < 0) {
    snprintf(err, n, "negative stride in geometry");
    return false;
  }
  if (layer_bases == nullptr) { snprintf(err, n, "layer base array is null"); return false; }
  for (int32_t l = 0; l < g->num_layers; ++l) {
    if (layer_bases[l] == 0) { snprintf(err, n, "layer %d base pointer is null", l); return false; }
  }
  if (n_ids < 0) { snprintf(err, n, "negative block count %lld", (long long)n_ids); return false; }
  if (skip_blocks < 0 || skip_blocks > n_ids) {
    snprintf(err, n, "skip_blocks=%lld outside [0, %lld]", (long long)skip_blocks,
             (long long)n_ids);
    return false;
  }
  if (n_ids > 0 && block_ids == nullptr) {
    snprintf(err, n, "block id array is null");
    return false;
  }
  for (int64_t j = 0; j < n_ids; ++j) {
    if (block_ids[j] < 0 || block_ids[j] >= g->num_blocks) {
      snprintf(err, n, "block id %lld at position %lld outside [0, %lld)",
               (long long)block_ids[j], (long long)j, (long long)g->num_blocks);
      return false;
    }
  }
  int64_t bytes = 0;
  if (__builtin_mul_overflow((int64_t)g->num_planes * g->num_layers, n_ids, &bytes) ||
      __builtin_mul_overflow(bytes, (int64_t)g->block_size * g->num_heads, &bytes) ||
      __builtin_mul_overflow(bytes, g->run_bytes, &bytes)) {
    snprintf(err, n, "slot size overflows int64");
    return false;
  }
  if (bytes > 0 && slot == nullptr) { snprintf(err, n, "slot pointer is null"); return false; }
  *slot_bytes = bytes;
  return true;
}

}  // namespace kvconn

#endif  // KVCONN_KV_TRANSFER_CHECK_H_
