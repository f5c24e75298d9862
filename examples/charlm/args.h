#pragma once
// A small command-line flag parser: typed flags bound to variables that hold
// their defaults, values checked as they are parsed, "--flag value" or
// "--flag=value" (a repeated flag keeps its last value), and a generated --help. Any problem is a UsageError whose
// one-line message names the flag; main() prints it and exits with code 2.
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace charlm {

// A bad command line (exit code 2).
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class FlagSet {
 public:
  // `command` as typed ("charlm train"), the usage line after it and a
  // paragraph describing the command, both for --help.
  FlagSet(std::string command, std::string usage, std::string description);

  // Following flags are listed under this heading in --help.
  void group(const std::string& title);

  // Each binds a flag to `*value`, whose current value is the default.
  // Numbers must lie in [min, max]; required flags must be given.
  void add_int(const std::string& name, int64_t* value, const std::string& help,
               int64_t min = std::numeric_limits<int64_t>::min(),
               int64_t max = std::numeric_limits<int64_t>::max(), bool required = false);
  void add_uint(const std::string& name, uint64_t* value, const std::string& help);
  // Finite numbers in [min, max] (exclusive at min when min_exclusive).
  void add_double(const std::string& name, double* value, const std::string& help, double min,
                  double max, bool min_exclusive = false);
  void add_string(const std::string& name, std::string* value, const std::string& metavar,
                  const std::string& help, bool required = false);
  // One of `choices`.
  void add_choice(const std::string& name, std::string* value, std::vector<std::string> choices,
                  const std::string& help);
  // A flag without a value: sets *value = when_given (e.g. --no-graph).
  void add_switch(const std::string& name, bool* value, bool when_given, const std::string& help);
  // Comma-separated integers >= min, e.g. "64,128,256".
  void add_int_list(const std::string& name, std::vector<int64_t>* value, const std::string& help,
                    int64_t min = 1);

  // Parses args (without the program and command names). Returns false when
  // --help or -h was given (the help is then printed to stdout); throws
  // UsageError otherwise.
  bool parse(const std::vector<std::string>& args);
  // Whether the flag appeared on the command line.
  bool given(const std::string& name) const;
  std::string help() const;
  const std::string& command() const { return command_; }

 private:
  struct Flag {
    std::string name, metavar, help, default_text, group;
    bool required = false, seen = false, takes_value = true;
    std::function<void(const std::string&)> set;  // parses and stores one value
  };
  Flag& add(const std::string& name, const std::string& metavar, const std::string& help,
            std::string default_text, bool required, std::function<void(const std::string&)> set);
  Flag* find(const std::string& name);
  const Flag* find(const std::string& name) const;

  std::string command_, usage_, description_, group_;
  std::vector<Flag> flags_;
};

// Value parsers (exposed for the commands' own checks). Each throws
// UsageError "--<flag>: ..." on a malformed or out-of-range value.
int64_t parse_int(const std::string& flag, const std::string& text);
double parse_double(const std::string& flag, const std::string& text);
std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& text, int64_t min);
std::string join(const std::vector<int64_t>& values, const char* separator = ",");

}  // namespace charlm
