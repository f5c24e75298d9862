#include "core/device.h"

#include "core/error.h"

namespace minidl {

Device Device::parse(const std::string& text) {
  if (text == "cpu") return cpu();
  if (text == "cuda") return cuda(0);
  if (text.rfind("cuda:", 0) == 0) {
    // N: decimal digits only, no sign, blanks or leading zeros (what str() writes).
    const std::string n = text.substr(5);
    const bool digits = !n.empty() && n.size() <= 9 && n.find_first_not_of("0123456789") == std::string::npos &&
                        (n.size() == 1 || n[0] != '0');
    if (digits) return cuda(std::stoi(n));
  }
  MINIDL_FAIL("Device::parse: expected \"cpu\", \"cuda\" or \"cuda:N\", got \"", text, "\"");
}

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

std::ostream& operator<<(std::ostream& os, const Device& device) { return os << device.str(); }

}  // namespace minidl
