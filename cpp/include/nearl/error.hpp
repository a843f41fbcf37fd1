// nearl::Error: every failure of the library, with one line naming the problem and the fix.
#pragma once

#include <stdexcept>
#include <string>

namespace nearl {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace nearl
