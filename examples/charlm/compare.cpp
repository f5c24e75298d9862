// `charlm compare`: vanilla vs dilated attention, same data, seed and recipe.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>

#include "commands.h"
#include "plot/plot.h"
#include "signals.h"
#include "train.h"

namespace charlm {

namespace fs = std::filesystem;

namespace {

constexpr const char* kCompareHelp =
    "Trains two models with the same data, seed and recipe, differing only in the\n"
    "attention layer: vanilla causal attention (into DIR/vanilla) and LongNet\n"
    "dilated attention with --segments/--dilations (into DIR/dilated). Both start\n"
    "from the same weights and see the same batches. Then writes DIR/compare.csv\n"
    "(both runs' losses by step), DIR/compare.png (the validation curves) and\n"
    "DIR/summary.txt, and prints final and best validation loss, tokens/s and\n"
    "peak memory of each.";

std::string bytes_text(size_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  if (b >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1024.0 * 1024 * 1024));
  else if (b >= 1024.0 * 1024) std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1024.0 * 1024));
  else std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024.0);
  return buf;
}

std::string cell(double v, const char* format) {
  if (std::isnan(v)) return "";
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

void write_compare_csv(const RunSummary& vanilla, const RunSummary& dilated, const std::string& path) {
  // Rows by step over both logs (they log at the same steps, but do not rely on it).
  std::map<int64_t, std::pair<LogRow, LogRow>> by_step;
  for (const LogRow& r : vanilla.log) by_step[r.step].first = r;
  for (const LogRow& r : dilated.log) by_step[r.step].second = r;
  std::ofstream out(path + ".tmp", std::ios::trunc);
  out << "step,vanilla_train_loss,vanilla_val_loss,dilated_train_loss,dilated_val_loss\n";
  for (auto& [step, pair] : by_step) {
    const LogRow& v = pair.first;
    const LogRow& d = pair.second;
    out << step << "," << cell(v.train_loss, "%.9g") << "," << cell(v.val_loss, "%.9g") << ","
        << cell(d.train_loss, "%.9g") << "," << cell(d.val_loss, "%.9g") << "\n";
  }
  out.close();
  MINIDL_CHECK(out.good(), "charlm compare: cannot write ", path);
  fs::rename(path + ".tmp", path);
}

void write_compare_plot(const RunSummary& vanilla, const RunSummary& dilated, const TrainOptions& o,
                        const std::string& path) {
  minidl::plot::Figure fig;
  fig.title = "validation loss: vanilla vs dilated attention";
  fig.x.label = "step";
  fig.y.label = "val loss (nats/char)";
  auto val_series = [](const RunSummary& run, std::string label) {
    minidl::plot::Series s{.label = std::move(label), .markers = true};
    for (const LogRow& r : run.log)
      if (!std::isnan(r.val_loss)) {
        s.x.push_back(static_cast<double>(r.step));
        s.y.push_back(r.val_loss);
      }
    return s;
  };
  fig.series = {val_series(vanilla, "vanilla"),
                val_series(dilated, "dilated w=" + join(o.model.segments) + " r=" + join(o.model.dilations))};
  minidl::plot::save_png(fig, path);
}

std::string summary_table(const RunSummary& vanilla, const RunSummary& dilated) {
  std::string out;
  char buf[200];
  std::snprintf(buf, sizeof buf, "%-9s %10s %10s %10s %12s %13s\n", "attention", "final val", "best val",
                "best step", "tokens/s", "peak memory");
  out += buf;
  for (const auto* run : {&vanilla, &dilated}) {
    std::snprintf(buf, sizeof buf, "%-9s %10.4f %10.4f %10lld %12.0f %13s\n", run == &vanilla ? "vanilla" : "dilated",
                  run->final_val_loss, run->best_val_loss, static_cast<long long>(run->best_step),
                  run->tokens_per_s, bytes_text(run->peak_bytes).c_str());
    out += buf;
  }
  return out;
}

}  // namespace

int cmd_compare(const std::vector<std::string>& args) {
  TrainOptions o;
  FlagSet flags("charlm compare", "--data FILE --out DIR [--segments N,N,... --dilations N,N,...] [flags]",
                kCompareHelp);
  flags.group("data and output");
  flags.add_string("data", &o.data, "FILE", "text file to learn (split 90/10 into train/validation)", true);
  flags.add_string("out", &o.out, "DIR", "writes DIR/vanilla, DIR/dilated, DIR/compare.csv, DIR/compare.png",
                   true);
  add_model_flags(flags, o.model, /*with_attention=*/false);
  add_training_flags(flags, o);
  if (!flags.parse(args)) return 0;
  o.model.attention = "dilated";
  check_options(flags, o);
  make_config(o.model, 1);  // fails now, not after the vanilla run, when dilated attention is missing

  const std::string dir = o.out;
  for (const char* kind : {"vanilla", "dilated"})
    if (fs::exists(fs::path(dir) / kind / "last.ckpt"))
      throw UsageError("--out: " + (fs::path(dir) / kind).string() +
                       " already holds a run; choose another directory");

  RunSummary runs[2];
  const char* kinds[2] = {"vanilla", "dilated"};
  for (int i = 0; i < 2; ++i) {
    TrainOptions run = o;
    run.model.attention = kinds[i];
    run.out = (fs::path(dir) / kinds[i]).string();
    runs[i] = train_run(run, nullptr, std::string("[") + kinds[i] + "] ");
    if (runs[i].stop_signal != 0) {
      std::cerr << "charlm compare: stopped during the " << kinds[i] << " run; no comparison written\n";
      return exit_code_for_signal(runs[i].stop_signal);
    }
  }
  write_compare_csv(runs[0], runs[1], (fs::path(dir) / "compare.csv").string());
  write_compare_plot(runs[0], runs[1], o, (fs::path(dir) / "compare.png").string());
  const std::string table = summary_table(runs[0], runs[1]);
  {
    std::ofstream out(fs::path(dir) / "summary.txt", std::ios::trunc);
    out << "segments " << join(o.model.segments) << ", dilations " << join(o.model.dilations) << ", "
        << o.iters << " steps, seed " << o.seed << "\n" << table;
  }
  std::cout << "\n" << table << "\nwrote " << (fs::path(dir) / "compare.csv").string() << ", "
            << (fs::path(dir) / "compare.png").string() << ", " << (fs::path(dir) / "summary.txt").string()
            << "\n";
  return 0;
}

}  // namespace charlm
