// GlmLayout::from_ids (see include/qinggeng/text/glm_layout.h).
#include "qinggeng/text/glm_layout.h"

#include <algorithm>

namespace qg::text {

GlmLayout GlmLayout::from_ids(const std::vector<int>& ids, int bos_id, int mask_id, int gmask_id) {
  GlmLayout layout;
  const auto bos = std::find(ids.begin(), ids.end(), bos_id);
  layout.context_length = static_cast<int>(bos - ids.begin());
  if (bos == ids.end()) {
    layout.mask_position = layout.context_length;  // never used: every token is context
    return layout;
  }
  auto mask = std::find(ids.begin(), ids.end(), gmask_id);
  if (mask == ids.end()) mask = std::find(ids.begin(), ids.end(), mask_id);
  layout.mask_position = mask == ids.end() ? std::max(layout.context_length - 1, 0)
                                           : static_cast<int>(mask - ids.begin());
  return layout;
}

}  // namespace qg::text
