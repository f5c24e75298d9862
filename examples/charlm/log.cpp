#include "log.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

#include "core/error.h"
#include "plot/plot.h"

namespace charlm {

namespace {

constexpr const char* kHeader = "step,train_loss,val_loss,lr,tokens_per_s,elapsed_s,run_id";
// The header before elapsed_s and run_id (read for resuming older runs).
constexpr const char* kOldHeader = "step,train_loss,val_loss,lr,tokens_per_s";

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

std::string errno_text(int error) { return std::strerror(error); }

}  // namespace

std::string format_row(const LogRow& r) {
  // Losses with 9 significant digits: enough to tell float32 values apart,
  // so resumed and uninterrupted runs can be compared exactly.
  return std::to_string(r.step) + "," + cell(r.train_loss, "%.9g") + "," + cell(r.val_loss, "%.9g") +
         "," + cell(r.lr, "%.6g") + "," + cell(r.tokens_per_s, "%.1f") + "," + cell(r.elapsed_s, "%.3f") +
         "," + r.run_id;
}

std::vector<LogRow> read_log(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  MINIDL_CHECK(file.good(), "charlm: cannot read ", path, ": ", errno_text(errno));
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  // Every row is appended with its newline: a last line without one was
  // being written when the run stopped (after a power loss, possibly NULs),
  // and its step lies past last.ckpt's, whose rows a resumed run recomputes.
  if (!text.empty() && text.back() != '\n') {
    const size_t cut = text.find_last_of('\n') + 1;  // 0 when there is no newline at all
    std::cerr << "[charlm] " << path << ": dropped an incomplete last line (the run stopped while writing it)\n";
    text.resize(cut);
  }
  std::istringstream in(text);
  std::vector<LogRow> rows;
  std::string line;
  int number = 0;
  size_t columns = 7;
  while (std::getline(in, line)) {
    ++number;
    if (number == 1) {
      MINIDL_CHECK(line == kHeader || line == kOldHeader, "charlm: ", path, " does not start with the header '",
                   kHeader, "'");
      if (line == kOldHeader) columns = 5;
      continue;
    }
    if (line.empty()) continue;
    std::vector<std::string> cells;
    std::stringstream ss(line);
    std::string c;
    while (std::getline(ss, c, ',')) cells.push_back(c);
    if (!line.empty() && line.back() == ',') cells.push_back("");
    MINIDL_CHECK(cells.size() == columns, "charlm: ", path, ":", number, ": expected ", columns, " cells, got ",
                 cells.size());
    LogRow r;
    r.step = static_cast<int64_t>(parse_cell(cells[0], path, number));
    r.train_loss = parse_cell(cells[1], path, number);
    r.val_loss = parse_cell(cells[2], path, number);
    r.lr = parse_cell(cells[3], path, number);
    r.tokens_per_s = parse_cell(cells[4], path, number);
    if (columns == 7) {
      r.elapsed_s = parse_cell(cells[5], path, number);
      r.run_id = cells[6];
    }
    rows.push_back(r);
  }
  return rows;
}

void write_file_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MINIDL_CHECK(fd >= 0, "charlm: cannot create ", tmp, ": ", errno_text(errno));
  int error = 0;
  for (size_t done = 0; done < text.size() && error == 0;) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n > 0) done += static_cast<size_t>(n);
    else if (n < 0 && errno != EINTR) error = errno;
  }
  if (::close(fd) != 0 && error == 0) error = errno;
  if (error == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) error = errno;
  if (error != 0) {
    ::unlink(tmp.c_str());  // no half-written file left behind
    MINIDL_FAIL("charlm: cannot write ", path, ": ", errno_text(error));
  }
}

LogWriter::LogWriter(const std::string& path, const std::vector<LogRow>& rows) : path_(path) {
  // Rewritten aside and renamed, so a crash here keeps the old log.
  std::string text = std::string(kHeader) + "\n";
  for (const LogRow& r : rows) text += format_row(r) + "\n";
  write_file_atomically(path, text);
  out_ = std::fopen(path.c_str(), "a");
  MINIDL_CHECK(out_ != nullptr, "charlm: cannot append to ", path, ": ", errno_text(errno));
}

LogWriter::~LogWriter() {
  if (out_) std::fclose(out_);
}

void LogWriter::append(const LogRow& row) {
  const std::string line = format_row(row) + "\n";
  errno = 0;
  const bool ok = std::fputs(line.c_str(), out_) >= 0 && std::fflush(out_) == 0;
  MINIDL_CHECK(ok, "charlm: cannot append to ", path_, ": ", errno_text(errno));
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
