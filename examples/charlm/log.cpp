#include "log.h"

#include <cstdio>
#include <filesystem>
#include <sstream>

#include "core/error.h"
#include "plot/plot.h"

namespace charlm {

namespace {

constexpr const char* kHeader = "step,train_loss,val_loss,lr,tokens_per_s";

std::string cell(double v, const char* format) {
  if (std::isnan(v)) return "";
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

double parse_cell(const std::string& text, const std::string& path, int line) {
  if (text.empty()) return NAN;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  MINIDL_CHECK(end == text.c_str() + text.size(), "charlm: ", path, ":", line, ": '", text,
               "' is not a number");
  return v;
}

}  // namespace

std::string format_row(const LogRow& r) {
  // Losses with 9 significant digits: enough to tell float32 values apart,
  // so resumed and uninterrupted runs can be compared exactly.
  return std::to_string(r.step) + "," + cell(r.train_loss, "%.9g") + "," + cell(r.val_loss, "%.9g") +
         "," + cell(r.lr, "%.6g") + "," + cell(r.tokens_per_s, "%.1f");
}

std::vector<LogRow> read_log(const std::string& path) {
  std::ifstream in(path);
  MINIDL_CHECK(in.good(), "charlm: cannot read ", path);
  std::vector<LogRow> rows;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (number == 1) {
      MINIDL_CHECK(line == kHeader, "charlm: ", path, " does not start with the header '", kHeader, "'");
      continue;
    }
    if (line.empty()) continue;
    std::vector<std::string> cells;
    std::stringstream ss(line);
    std::string c;
    while (std::getline(ss, c, ',')) cells.push_back(c);
    if (!line.empty() && line.back() == ',') cells.push_back("");
    MINIDL_CHECK(cells.size() == 5, "charlm: ", path, ":", number, ": expected 5 cells, got ", cells.size());
    LogRow r;
    r.step = static_cast<int64_t>(parse_cell(cells[0], path, number));
    r.train_loss = parse_cell(cells[1], path, number);
    r.val_loss = parse_cell(cells[2], path, number);
    r.lr = parse_cell(cells[3], path, number);
    r.tokens_per_s = parse_cell(cells[4], path, number);
    rows.push_back(r);
  }
  return rows;
}

LogWriter::LogWriter(const std::string& path, const std::vector<LogRow>& rows) : path_(path) {
  // Rewritten aside and renamed, so a crash here keeps the old log.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << kHeader << "\n";
    for (const LogRow& r : rows) out << format_row(r) << "\n";
    out.flush();
    MINIDL_CHECK(out.good(), "charlm: cannot write ", tmp);
  }
  std::filesystem::rename(tmp, path);
  out_.open(path, std::ios::app);
  MINIDL_CHECK(out_.good(), "charlm: cannot append to ", path);
}

void LogWriter::append(const LogRow& row) {
  out_ << format_row(row) << "\n";
  out_.flush();
  MINIDL_CHECK(out_.good(), "charlm: cannot append to ", path_);
}

void write_loss_plot(const std::vector<LogRow>& rows, const std::string& path, const std::string& title) {
  minidl::plot::Series train{.label = "train"}, val{.label = "val", .markers = true};
  for (const LogRow& r : rows) {
    if (!std::isnan(r.train_loss)) {
      train.x.push_back(static_cast<double>(r.step));
      train.y.push_back(r.train_loss);
    }
    if (!std::isnan(r.val_loss)) {
      val.x.push_back(static_cast<double>(r.step));
      val.y.push_back(r.val_loss);
    }
  }
  minidl::plot::Figure fig;
  fig.title = title;
  fig.x.label = "step";
  fig.y.label = "loss (nats/char)";
  fig.series = {train, val};
  minidl::plot::save_png(fig, path);
}

}  // namespace charlm
