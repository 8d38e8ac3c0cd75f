// Runtime LoRA on the GPU: y += scale_a * (x A_a^T) B_a^T for a batch whose rows each pick an
// adapter a (or none), without merging and without forming anything larger than [tokens, r]
// per K-split (see lora_add_workspace_bytes).
//
// GpuLoraStack is the device-side registry of one target module (say every layer's
// query_key_value) for up to `capacity` adapters, addressed by adapter id (slot). Slots are
// loaded and unloaded at run time; pointers never move, so a captured CUDA graph stays valid.
// lora_add_f16 runs two kernels on the caller's stream, both on tensor cores (mma.sync, sm_80
// and newer): shrink u = x A^T with fp32 accumulation split over K, then expand
// y += scale * u B^T with the fp16 output rounded once.
// Pointers are fp16 bit patterns (uint16_t) so this header does not need cuda_fp16.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "qinggeng/lora/lora_adapter.h"

namespace qg::cuda {

/// \brief Largest LoRA rank the kernels take.
inline constexpr std::int64_t kLoraMaxRank = 64;

/// \brief Device pointers of one layer of a GpuLoraStack, as the kernels read them.
struct LoraLayerView {
  const std::uint16_t* a = nullptr;  ///< fp16 [capacity, rank_padded, in], zero-padded rows
  const std::uint16_t* b = nullptr;  ///< fp16 [capacity, out, rank_padded], zero-padded cols
  const float* scales = nullptr;     ///< [capacity]; 0 for an empty slot
  int capacity = 0;
  int rank_padded = 0;               ///< max rank rounded up to a multiple of 16
  std::int64_t in = 0, out = 0;
};

/// \brief Several adapters' factors of one target module, every layer, on the device.
class GpuLoraStack {
 public:
  /// \brief Allocates room for `capacity` adapters of rank <= max_rank (<= kLoraMaxRank) for
  /// `target` of a model shaped like `model`; every slot starts empty.
  /// \throws qg::Error for bad sizes or when device memory runs out.
  GpuLoraStack(lora::LoraTarget target, const io::ModelConfig& model, int capacity,
               int max_rank);
  ~GpuLoraStack();
  GpuLoraStack(const GpuLoraStack&) = delete;
  GpuLoraStack& operator=(const GpuLoraStack&) = delete;

  /// \brief Uploads `adapter`'s factors for this target into slot `id` (replacing what was
  /// there). Layers the adapter does not adapt get zero factors; an adapter that does not
  /// target this module leaves the slot empty, so its rows are untouched here. Synchronous.
  /// \throws qg::Error naming the slot for an id out of range, a rank above max_rank, or an
  /// adapter made for a different model shape.
  void load(int id, const lora::LoraAdapter& adapter);
  /// \brief Empties slot `id`: rows that select it are left untouched from now on.
  void unload(int id);
  /// \brief True when slot `id` holds an adapter that targets this module.
  bool loaded(int id) const;

  lora::LoraTarget target() const { return target_; }
  int capacity() const { return capacity_; }
  int num_layers() const { return num_layers_; }
  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  /// \brief The device view of one layer. \throws qg::Error for a layer out of range.
  LoraLayerView layer(int layer) const;

 private:
  lora::LoraTarget target_;
  int num_layers_ = 0, capacity_ = 0, max_rank_ = 0, rank_padded_ = 0;
  std::int64_t in_ = 0, out_ = 0;
  std::uint16_t* a_ = nullptr;
  std::uint16_t* b_ = nullptr;
  float* scales_ = nullptr;
  std::vector<float> host_scales_;
};

/// \brief Bytes of scratch lora_add_f16 needs for `tokens` rows of `layer`.
std::size_t lora_add_workspace_bytes(const LoraLayerView& layer, std::int64_t tokens);

/// \brief y[t] += scale_a (x[t] A_a^T) B_a^T for each row t, a = adapter_of_row[t].
///
/// Rows whose id is -1, outside [0, capacity) or names an empty slot are not touched.
/// \param x fp16 [tokens, in] row-major, 4-byte aligned
/// \param y fp16 [tokens, out] row-major, updated in place (the base Linear's output)
/// \param adapter_of_row device int32 [tokens]
/// \param workspace device scratch of at least lora_add_workspace_bytes(layer, tokens)
/// \throws qg::Error for in/out not multiples of 8, missing pointers, a short workspace or a
///         failed launch. tokens == 0 does nothing.
void lora_add_f16(const LoraLayerView& layer, const std::uint16_t* x, std::uint16_t* y,
                  std::int64_t tokens, const std::int32_t* adapter_of_row, void* workspace,
                  std::size_t workspace_bytes, cudaStream_t stream);

/// \brief Checks a host copy of the per-row ids against `stack` (the kernels cannot throw).
/// \throws qg::Error naming the first row whose id is below -1, at or above the capacity.
void check_adapter_rows(const GpuLoraStack& stack, const std::vector<std::int32_t>& ids);

}  // namespace qg::cuda
