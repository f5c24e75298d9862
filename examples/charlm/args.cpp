#include "args.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <sstream>

namespace charlm {

namespace {

std::string format_default(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

}  // namespace

int64_t parse_int(const std::string& flag, const std::string& text) {
  int64_t v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || ptr != end)
    throw UsageError("--" + flag + ": expected an integer, got '" + text + "'");
  return v;
}

double parse_double(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = text.empty() ? 0 : std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || !std::isfinite(v))
    throw UsageError("--" + flag + ": expected a finite number, got '" + text + "'");
  return v;
}

std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& text, int64_t min) {
  std::vector<int64_t> values;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    int64_t v = 0;
    try {
      v = parse_int(flag, item);
    } catch (const UsageError&) {
      throw UsageError("--" + flag + ": expected comma-separated integers (e.g. 64,128,256), got '" +
                       text + "'");
    }
    if (v < min)
      throw UsageError("--" + flag + ": every entry must be >= " + std::to_string(min) + ", got " +
                       std::to_string(v) + " in '" + text + "'");
    values.push_back(v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return values;
}

std::string join(const std::vector<int64_t>& values, const char* separator) {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) out += (i ? separator : "") + std::to_string(values[i]);
  return out;
}

FlagSet::FlagSet(std::string command, std::string usage, std::string description)
    : command_(std::move(command)), usage_(std::move(usage)), description_(std::move(description)) {}

void FlagSet::group(const std::string& title) { group_ = title; }

FlagSet::Flag& FlagSet::add(const std::string& name, const std::string& metavar,
                            const std::string& help, std::string default_text, bool required,
                            std::function<void(const std::string&)> set) {
  flags_.push_back({.name = name,
                    .metavar = metavar,
                    .help = help,
                    .default_text = std::move(default_text),
                    .group = group_,
                    .required = required,
                    .set = std::move(set)});
  return flags_.back();
}

void FlagSet::add_int(const std::string& name, int64_t* value, const std::string& help, int64_t min,
                      int64_t max, bool required) {
  add(name, "N", help, required ? "" : std::to_string(*value), required,
      [name, value, min, max](const std::string& text) {
        const int64_t v = parse_int(name, text);
        if (v < min) throw UsageError("--" + name + " must be >= " + std::to_string(min) + ", got " + text);
        if (v > max) throw UsageError("--" + name + " must be <= " + std::to_string(max) + ", got " + text);
        *value = v;
      });
}

void FlagSet::add_uint(const std::string& name, uint64_t* value, const std::string& help) {
  add(name, "N", help, std::to_string(*value), false, [name, value](const std::string& text) {
    uint64_t v = 0;
    const char* end = text.data() + text.size();
    auto [ptr, ec] = std::from_chars(text.data(), end, v);
    if (text.empty() || ec != std::errc() || ptr != end)
      throw UsageError("--" + name + ": expected a non-negative integer, got '" + text + "'");
    *value = v;
  });
}

void FlagSet::add_double(const std::string& name, double* value, const std::string& help, double min,
                         double max, bool min_exclusive) {
  add(name, "X", help, format_default(*value), false,
      [name, value, min, max, min_exclusive](const std::string& text) {
        const double v = parse_double(name, text);
        if (min_exclusive ? !(v > min) : !(v >= min))
          throw UsageError("--" + name + " must be " + (min_exclusive ? "> " : ">= ") +
                           format_default(min) + ", got " + text);
        if (v > max) throw UsageError("--" + name + " must be <= " + format_default(max) + ", got " + text);
        *value = v;
      });
}

void FlagSet::add_string(const std::string& name, std::string* value, const std::string& metavar,
                         const std::string& help, bool required) {
  add(name, metavar, help, value->empty() ? "" : *value, required, [name, value](const std::string& text) {
    if (text.empty()) throw UsageError("--" + name + " needs a non-empty value");
    *value = text;
  });
}

void FlagSet::add_choice(const std::string& name, std::string* value, std::vector<std::string> choices,
                         const std::string& help) {
  std::string metavar;
  for (const std::string& c : choices) metavar += (metavar.empty() ? "" : "|") + c;
  add(name, metavar, help, *value, false, [name, value, choices, metavar](const std::string& text) {
    for (const std::string& c : choices)
      if (c == text) {
        *value = text;
        return;
      }
    throw UsageError("--" + name + " must be one of " + metavar + ", got '" + text + "'");
  });
}

void FlagSet::add_int_list(const std::string& name, std::vector<int64_t>* value, const std::string& help,
                           int64_t min) {
  add(name, "N,N,...", help, join(*value), false, [name, value, min](const std::string& text) {
    *value = parse_int_list(name, text, min);
  });
}

void FlagSet::add_switch(const std::string& name, bool* value, bool when_given, const std::string& help) {
  add(name, "", help, "", false, [value, when_given](const std::string&) { *value = when_given; }).takes_value =
      false;
}

FlagSet::Flag* FlagSet::find(const std::string& name) {
  for (Flag& f : flags_)
    if (f.name == name) return &f;
  return nullptr;
}

const FlagSet::Flag* FlagSet::find(const std::string& name) const {
  for (const Flag& f : flags_)
    if (f.name == name) return &f;
  return nullptr;
}

bool FlagSet::given(const std::string& name) const {
  const Flag* f = find(name);
  return f != nullptr && f->seen;
}

bool FlagSet::parse(const std::vector<std::string>& args) {
  for (const std::string& a : args)
    if (a == "--help" || a == "-h") {
      std::cout << help();
      return false;
    }
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.rfind("--", 0) != 0 || arg.size() == 2)
      throw UsageError("unexpected argument '" + arg + "' (flags start with --; see " + command_ +
                       " --help)");
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (const size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    Flag* flag = find(name);
    if (flag == nullptr) throw UsageError("unknown flag --" + name + " (see " + command_ + " --help)");
    if (!flag->takes_value) {
      if (has_value) throw UsageError("--" + name + " takes no value, got '" + value + "'");
    } else if (!has_value) {
      if (i + 1 >= args.size() || args[i + 1].rfind("--", 0) == 0)
        throw UsageError("--" + name + " needs a value (" + flag->metavar + ")");
      value = args[++i];
    }
    // A repeated flag takes its last value, so wrappers can pass defaults
    // and let the user's arguments after them override.
    flag->set(value);
    flag->seen = true;
  }
  for (const Flag& f : flags_)
    if (f.required && !f.seen) throw UsageError("--" + f.name + " is required (see " + command_ + " --help)");
  return true;
}

std::string FlagSet::help() const {
  std::ostringstream os;
  os << "usage: " << command_ << " " << usage_ << "\n\n" << description_ << "\n";
  size_t width = 0;
  for (const Flag& f : flags_) width = std::max(width, f.name.size() + f.metavar.size() + 3);
  std::string group = "\x01";
  for (const Flag& f : flags_) {
    if (f.group != group) {
      group = f.group;
      os << "\n" << (group.empty() ? "flags" : group) << ":\n";
    }
    std::string left = "--" + f.name + " " + f.metavar;
    os << "  " << left << std::string(width + 2 - left.size(), ' ') << f.help;
    if (f.required) os << " (required)";
    else if (!f.default_text.empty()) os << " (default " << f.default_text << ")";
    os << "\n";
  }
  os << "\n  --help" << std::string(width - 4, ' ') << "show this help\n";
  return os.str();
}

}  // namespace charlm
