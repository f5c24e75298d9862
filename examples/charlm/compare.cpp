// `charlm compare`: vanilla vs dilated attention, same data, seed and recipe.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>

#include "commands.h"
#include "dist/launch.h"
#include "plot/plot.h"
#include "progress.h"
#include "signals.h"
#include "train.h"

namespace charlm {

namespace fs = std::filesystem;
namespace nn = minidl::nn;

namespace {

constexpr const char* kCompareUsage =
    "--data FILE --out DIR [--segments N,N,... --dilations N,N,...] [flags]\n"
    "       charlm compare --resume DIR [--iters N] [flags]";
constexpr const char* kCompareHelp =
    "Trains two models with the same data, seed and recipe, differing only in the\n"
    "attention layer: vanilla causal attention (into DIR/vanilla) and LongNet\n"
    "dilated attention with --segments/--dilations (into DIR/dilated). Both start\n"
    "from the same weights and see the same batches. Then writes DIR/compare.csv\n"
    "(both runs' losses and elapsed seconds by step), DIR/compare.png (validation\n"
    "loss against step and against wall-clock time, their difference, and the last\n"
    "half of the run) and DIR/summary.txt, and prints final and best validation\n"
    "loss, tokens/s, time and peak memory of each. Segments longer than --context\n"
    "act as the whole context (a warning says so). --out refuses a directory that\n"
    "holds a run's files. An interrupted comparison continues with --resume DIR\n"
    "(its recipe is kept in DIR/compare.run; like train --resume, only --data,\n"
    "--iters, the evaluation and logging flags, --device, --dtype, --threads,\n"
    "--dp, --sp and --no-graph may change).";

constexpr const char* kCompareFile = "compare.run";
constexpr const char* kCompareIdKey = "compare.id";
constexpr const char* kCompareDeviceKey = "compare.device";

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

// The segment lengths dilated attention uses: a segment longer than the context is the whole context.
std::vector<int64_t> effective_segments(const ModelOptions& m) {
  std::vector<int64_t> w = m.segments;
  for (int64_t& s : w) s = std::min(s, m.context);
  return w;
}

// Rows by step over both logs (they log at the same steps, but do not rely on it).
std::map<int64_t, std::pair<LogRow, LogRow>> rows_by_step(const RunSummary& vanilla, const RunSummary& dilated) {
  std::map<int64_t, std::pair<LogRow, LogRow>> by_step;
  for (const LogRow& r : vanilla.log) by_step[r.step].first = r;
  for (const LogRow& r : dilated.log) by_step[r.step].second = r;
  return by_step;
}

void write_compare_csv(const RunSummary& vanilla, const RunSummary& dilated, const std::string& path) {
  std::string text =
      "step,vanilla_train_loss,vanilla_val_loss,dilated_train_loss,dilated_val_loss,vanilla_elapsed_s,"
      "dilated_elapsed_s\n";
  for (auto& [step, pair] : rows_by_step(vanilla, dilated)) {
    const LogRow& v = pair.first;
    const LogRow& d = pair.second;
    text += std::to_string(step) + "," + cell(v.train_loss, "%.9g") + "," + cell(v.val_loss, "%.9g") + "," +
            cell(d.train_loss, "%.9g") + "," + cell(d.val_loss, "%.9g") + "," + cell(v.elapsed_s, "%.3f") + "," +
            cell(d.elapsed_s, "%.3f") + "\n";
  }
  write_file_atomically(path, text);
}

// Validation loss against step (or elapsed seconds), from `first_step` on.
minidl::plot::Series val_series(const RunSummary& run, std::string label, bool by_time, int64_t first_step = 0) {
  minidl::plot::Series s{.label = std::move(label), .markers = true};
  for (const LogRow& r : run.log)
    if (!std::isnan(r.val_loss) && r.step >= first_step) {
      s.x.push_back(by_time ? r.elapsed_s : static_cast<double>(r.step));
      s.y.push_back(r.val_loss);
    }
  return s;
}

// Four panels: validation loss by step and by wall-clock time, the
// difference of the two curves, and the last half of the run up close (the
// curves overlap at the scale of the whole run).
void write_compare_plot(const RunSummary& vanilla, const RunSummary& dilated, const TrainOptions& o,
                        const std::string& path) {
  using minidl::plot::Figure;
  const std::string dilated_label =
      "dilated w=" + join(effective_segments(o.model)) + " r=" + join(o.model.dilations);
  auto panel = [](std::string title, std::string x_label, std::string y_label) {
    Figure f;
    f.title = std::move(title);
    f.x.label = std::move(x_label);
    f.y.label = std::move(y_label);
    f.width = 720;
    f.height = 450;
    return f;
  };
  Figure by_step = panel("validation loss by step", "step", "val loss (nats/char)");
  by_step.series = {val_series(vanilla, "vanilla", false), val_series(dilated, dilated_label, false)};

  Figure by_time = panel("validation loss by wall-clock time", "seconds (training, evaluation, saving)",
                         "val loss (nats/char)");
  by_time.series = {val_series(vanilla, "vanilla", true), val_series(dilated, dilated_label, true)};

  Figure difference = panel("dilated minus vanilla validation loss", "step", "difference (nats/char)");
  minidl::plot::Series diff{.label = "dilated - vanilla", .color = minidl::plot::palette(3), .markers = true};
  for (auto& [step, pair] : rows_by_step(vanilla, dilated))
    if (!std::isnan(pair.first.val_loss) && !std::isnan(pair.second.val_loss)) {
      diff.x.push_back(static_cast<double>(step));
      diff.y.push_back(pair.second.val_loss - pair.first.val_loss);
    }
  minidl::plot::Series zero{.color = minidl::plot::Color{150, 150, 150}, .line_width = 1};  // y = 0
  if (!diff.x.empty()) {
    zero.x = {diff.x.front(), diff.x.back()};
    zero.y = {0, 0};
  }
  difference.series = {zero, diff};

  const int64_t last = std::max(vanilla.step, dilated.step);
  Figure zoom = panel("validation loss from step " + std::to_string(last / 2), "step", "val loss (nats/char)");
  zoom.series = {val_series(vanilla, "vanilla", false, last / 2), val_series(dilated, dilated_label, false, last / 2)};

  minidl::plot::save_png({by_step, by_time, difference, zoom}, 2, path);
}

std::string summary_table(const RunSummary& vanilla, const RunSummary& dilated) {
  std::string out;
  char buf[200];
  std::snprintf(buf, sizeof buf, "%-9s %10s %10s %10s %12s %9s %13s\n", "attention", "final val", "best val",
                "best step", "tokens/s", "time", "peak memory");
  out += buf;
  for (const auto* run : {&vanilla, &dilated}) {
    std::snprintf(buf, sizeof buf, "%-9s %10.4f %10.4f %10lld %12.0f %9s %13s\n", run == &vanilla ? "vanilla" : "dilated",
                  run->final_val_loss, run->best_val_loss, static_cast<long long>(run->best_step),
                  run->tokens_per_s, format_duration(run->elapsed_seconds).c_str(),
                  bytes_text(run->peak_bytes).c_str());
    out += buf;
  }
  return out;
}

// DIR/compare.run: the comparison's recipe, id and device, for --resume (a
// checkpoint file holding metadata only, so it is written atomically and
// verified when read).
void save_compare_state(const std::string& dir, const TrainOptions& o, const std::string& id) {
  nn::Metadata meta = recipe_metadata(o, 1);
  meta[kCompareIdKey] = id;
  meta[kCompareDeviceKey] = o.device;
  nn::save_checkpoint((fs::path(dir) / kCompareFile).string(), {}, meta);
}

}  // namespace

int cmd_compare(const std::vector<std::string>& args) {
  TrainOptions o;
  std::string resume_dir;
  FlagSet flags("charlm compare", kCompareUsage, kCompareHelp);
  flags.group("data and output");
  flags.add_string("data", &o.data, "FILE", "text file to learn (split 90/10 into train/validation)");
  flags.add_string("out", &o.out, "DIR",
                   "new or empty directory: DIR/vanilla, DIR/dilated, DIR/compare.csv, DIR/compare.png, "
                   "DIR/summary.txt (the results table), DIR/compare.run (the recipe, for --resume)");
  flags.add_string("resume", &resume_dir, "DIR", "continue the interrupted comparison in DIR");
  add_model_flags(flags, o.model, /*with_attention=*/false);
  add_training_flags(flags, o);
  if (!flags.parse(args)) return 0;
  if (minidl::dist::process_rank_from_env().world > 1)
    throw UsageError("compare runs in one process (WORLD_SIZE is set above 1): its --dp ranks are threads");
  o.model.attention = "dilated";

  std::string id;
  const bool resuming = !resume_dir.empty();
  if (!resuming) {
    if (o.data.empty()) throw UsageError("--data is required (or --resume DIR to continue a comparison)");
    if (o.out.empty()) throw UsageError("--out is required (or --resume DIR to continue a comparison)");
    check_options(flags, o);
    make_config(o.model, 1);  // fails now, not after the vanilla run, when dilated attention is missing
    const std::vector<std::string> found = run_artifacts(o.out);
    if (!found.empty()) {
      std::string list;
      for (const std::string& name : found) list += (list.empty() ? "" : ", ") + name;
      throw UsageError("--out: " + o.out + " already holds a run (" + list + "); " +
                       (fs::exists(fs::path(o.out) / kCompareFile) ? "continue it with --resume " + o.out + " or choose"
                                                                   : "choose") +
                       " another directory");
    }
    id = new_run_id();
  } else {
    if (flags.given("out") && fs::weakly_canonical(o.out) != fs::weakly_canonical(resume_dir))
      throw UsageError("--out: a resumed comparison continues in its own directory " + resume_dir +
                       "; leave --out out");
    const fs::path state = fs::path(resume_dir) / kCompareFile;
    if (!fs::exists(state))
      throw UsageError("--resume: " + state.string() + " does not exist (not a directory written by charlm compare)");
    const nn::Metadata meta = nn::load_checkpoint(state.string()).metadata;
    auto it = meta.find(kCompareIdKey);
    MINIDL_CHECK(it != meta.end(), "charlm compare: ", state.string(), " has no '", kCompareIdKey, "'");
    id = it->second;
    TrainOptions recipe = recipe_from_metadata(meta);
    if (auto d = meta.find(kCompareDeviceKey); d != meta.end()) recipe.device = d->second;
    check_resume_flags(flags, o, recipe);
    o = with_run_flags(flags, o, recipe);
    o.out = resume_dir;
    check_options(FlagSet("", "", ""), o);
  }

  const std::vector<int64_t> effective = effective_segments(o.model);
  if (!resuming && effective != o.model.segments)
    std::cerr << "charlm compare: warning: --segments " << join(o.model.segments) << " exceed --context "
              << o.model.context << "; a segment longer than the context covers the whole context, so the "
              << "effective segments are " << join(effective) << "\n";

  const std::string dir = o.out;
  // A comparison that fails before its vanilla run has a directory (bad data,
  // say) leaves nothing that would make --out refuse the directory.
  std::optional<FreshDirGuard> fresh_guard;
  if (!resuming) fresh_guard.emplace(dir, std::vector<std::string>{kCompareFile}, "vanilla");
  fs::create_directories(dir);
  save_compare_state(dir, o, id);

  RunSummary runs[2];
  const char* kinds[2] = {"vanilla", "dilated"};
  const std::string resume_command = "charlm compare --resume " + dir;
  for (int i = 0; i < 2; ++i) {
    TrainOptions run = o;
    run.model.attention = kinds[i];
    run.out = (fs::path(dir) / kinds[i]).string();
    run.run_id = id + "-" + kinds[i];  // refuses a run directory of another comparison on --resume
    const std::string label = std::string("[") + kinds[i] + "] ";
    if (resuming && fs::exists(fs::path(run.out) / "last.ckpt")) {
      ResumedRun resumed = load_resumed_run(run.out, flags, o);
      // Both runs continue with the comparison's settings.
      TrainOptions& r = resumed.options;
      r.data = o.data;
      r.iters = o.iters;
      r.eval_interval = o.eval_interval;
      r.eval_iters = o.eval_iters;
      r.log_interval = o.log_interval;
      r.dtype = o.dtype;
      r.threads = o.threads;
      r.run_id = run.run_id;
      runs[i] = train_run(r, &resumed.checkpoint, label, resume_command);
    } else {
      runs[i] = train_run(run, nullptr, label, resume_command);
    }
    if (runs[i].stop_signal != 0) {
      std::cerr << "charlm compare: stopped during the " << kinds[i]
                << " run; no comparison written. Continue with: " << resume_command << "\n";
      return exit_code_for_signal(runs[i].stop_signal);
    }
  }
  write_compare_csv(runs[0], runs[1], (fs::path(dir) / "compare.csv").string());
  write_compare_plot(runs[0], runs[1], o, (fs::path(dir) / "compare.png").string());
  const std::string table = summary_table(runs[0], runs[1]);
  write_file_atomically((fs::path(dir) / "summary.txt").string(),
                        "segments " + join(o.model.segments) + " (effective " + join(effective) + "), dilations " +
                            join(o.model.dilations) + ", context " + std::to_string(o.model.context) + ", " +
                            std::to_string(o.iters) + " steps, seed " + std::to_string(o.seed) + "\n" + table);
  std::cout << "\n" << table << "\nwrote " << (fs::path(dir) / "compare.csv").string() << ", "
            << (fs::path(dir) / "compare.png").string() << ", " << (fs::path(dir) / "summary.txt").string()
            << "\n";
  return 0;
}

}  // namespace charlm
