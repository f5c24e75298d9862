#pragma once
// minidl::Error and the checks that raise it. Messages name the op, the
// shapes/dtypes/devices involved and what was expected.
#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>

namespace minidl {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// The message of a caught exception (for reports of a rank's failure).
inline std::string exception_message(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}
}  // namespace detail

}  // namespace minidl

// MINIDL_CHECK(cond, "op: ", what, ...) throws minidl::Error with the pieces
// streamed together when cond is false.
#define MINIDL_CHECK(cond, ...)                                        \
  do {                                                                 \
    if (!(cond)) throw ::minidl::Error(::minidl::detail::concat(__VA_ARGS__)); \
  } while (0)

#define MINIDL_FAIL(...) throw ::minidl::Error(::minidl::detail::concat(__VA_ARGS__))
