// TensorBoard event files without TensorFlow: CRC32C, TFRecord framing and the few protobuf
// fields of tensorflow.Event that scalar summaries need. Internal to the library (the tests
// use it to check the writer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qinggeng/train/metrics.h"

namespace qg::train::tfrecord {

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `data`.
std::uint32_t crc32c(std::string_view data);

/// The CRC as TFRecord stores it: rotated right by 15 bits plus 0xA282EAD8, so that a CRC of
/// data that itself holds CRCs does not degenerate.
std::uint32_t masked_crc32c(std::string_view data);

/// One TFRecord: uint64 length (little-endian), masked CRC of those 8 bytes, the payload, the
/// masked CRC of the payload.
std::string frame(std::string_view payload);

/// The Event that opens every event file: wall_time (field 1) and file_version (field 3)
/// "brain.Event:2".
std::string file_version_event(double wall_time);

/// An Event with wall_time (1), step (2) and a Summary (5) holding one Value per scalar:
/// tag (1) and simple_value (2, float).
std::string scalars_event(double wall_time, std::int64_t step, const std::vector<Scalar>& scalars);

}  // namespace qg::train::tfrecord
