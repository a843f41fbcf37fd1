// SHA-256 of a file (FIPS 180-4), to check that a preprocessing graph belongs to its classifier.
#pragma once

#include <string>

namespace nearl::detail {

// Lower-case hex digest; throws nearl::Error when the file cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace nearl::detail
