#include "plot/plot.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <limits>

#include "core/error.h"

namespace minidl::plot {

// A benchmark's legend holds a dozen series or more.
Color palette(size_t index) {
  static constexpr std::array<Color, 20> kColors = {{{31, 119, 180},
                                                     {255, 127, 14},
                                                     {44, 160, 44},
                                                     {214, 39, 40},
                                                     {148, 103, 189},
                                                     {140, 86, 75},
                                                     {227, 119, 194},
                                                     {127, 127, 127},
                                                     {188, 189, 34},
                                                     {23, 190, 207},
                                                     {0, 0, 128},
                                                     {128, 0, 0},
                                                     {0, 128, 128},
                                                     {230, 190, 0},
                                                     {0, 0, 0},
                                                     {128, 128, 0},
                                                     {255, 0, 255},
                                                     {90, 200, 90},
                                                     {255, 160, 160},
                                                     {100, 100, 255}}};
  return kColors[index % kColors.size()];
}

namespace {

// Removes trailing zeros (and a trailing '.') of a fixed-point rendering.
std::string strip_zeros(std::string s) {
  if (s.find('.') == std::string::npos) return s;
  while (!s.empty() && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s == "-0" ? "0" : s;
}

// `decimals` digits after the point; trailing zeros dropped when `strip`.
std::string fixed(double value, int decimals, bool strip = true) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", std::clamp(decimals, 0, 12), value);
  std::string s = strip ? strip_zeros(buf) : std::string(buf);
  return s.find_first_not_of("-0.") == std::string::npos ? "0" : s;  // no "-0" or "0.00"
}

// Ticks in value space at 1, 2 or 5 x 10^k steps.
std::vector<Tick> linear_ticks(double lo, double hi, int target) {
  const double raw = (hi - lo) / std::max(target, 1);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / magnitude;
  const double step = (norm < 1.5 ? 1 : norm < 3.5 ? 2 : norm < 7.5 ? 5 : 10) * magnitude;
  const double big = std::max(std::fabs(lo), std::fabs(hi));
  // Decimals that show the step; scientific labels for very large or small values.
  const int decimals = std::max(0, -static_cast<int>(std::floor(std::log10(step) + 1e-9)));
  const bool scientific = big >= 1e6 || step < 1e-4;
  std::vector<Tick> ticks;
  const double first = std::ceil(lo / step - 1e-9), last = std::floor(hi / step + 1e-9);
  for (double k = first; k <= last; k += 1) {
    double v = k * step;
    if (std::fabs(v) < step * 1e-9) v = 0;
    // Every label with the step's decimals ("2.5", "3.0", "3.5").
    ticks.push_back({v, scientific ? format_number(v) : fixed(v, decimals, /*strip=*/false)});
  }
  return ticks;
}

std::vector<Tick> log_ticks(double lo, double hi, int target) {
  const double a = std::log10(lo), b = std::log10(hi);
  const double span = b - a;
  if (span < std::log10(3.0)) {
    return linear_ticks(lo, hi, std::max(3, target - 2));
  }
  auto inside = [&](double v) { return v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9); };
  std::vector<Tick> ticks;
  const int k0 = static_cast<int>(std::floor(a)), k1 = static_cast<int>(std::ceil(b));
  if (span < 2) {
    for (int k = k0; k <= k1; ++k)
      for (int m = 1; m <= 9; ++m) {
        const double v = m * std::pow(10.0, k);
        const bool major = m == 1 || m == 2 || m == 5;
        if (inside(v)) ticks.push_back({v, major ? format_number(v) : std::string()});
      }
    return ticks;
  }
  const int decades = static_cast<int>(std::floor(b + 1e-9) - std::ceil(a - 1e-9)) + 1;
  const int stride = std::max(1, (decades + target - 1) / std::max(target, 1));
  for (int k = k0; k <= k1; ++k) {
    const double decade = std::pow(10.0, k);
    if (inside(decade)) ticks.push_back({decade, k % stride == 0 ? format_number(decade) : std::string()});
    if (stride == 1 && decades <= 8)
      for (int m = 2; m <= 9; ++m)
        if (inside(m * decade)) ticks.push_back({m * decade, std::string()});
  }
  return ticks;
}

// The axis range: the data's (with `pad` of the span on each side), the
// user's min/max where given.
struct Range {
  double lo, hi;
};

Range axis_range(const Axis& axis, const std::vector<double>& values, double pad, const char* which) {
  MINIDL_CHECK(!axis.log || ((!axis.min || *axis.min > 0) && (!axis.max || *axis.max > 0)),
               "plot: the ", which, " axis is logarithmic, so its min and max must be positive");
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (double v : values) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  auto to_t = [&](double v) { return axis.log ? std::log10(v) : v; };
  auto from_t = [&](double t) { return axis.log ? std::pow(10.0, t) : t; };
  double tlo, thi;
  if (values.empty()) {
    tlo = 0, thi = 1;
  } else if (lo == hi) {
    tlo = to_t(lo) - (axis.log ? 0.3 : std::max(1.0, std::fabs(lo) * 0.1));
    thi = to_t(hi) + (axis.log ? 0.3 : std::max(1.0, std::fabs(hi) * 0.1));
  } else {
    const double span = to_t(hi) - to_t(lo);
    tlo = to_t(lo) - pad * span;
    thi = to_t(hi) + pad * span;
  }
  Range r{axis.min ? *axis.min : from_t(tlo), axis.max ? *axis.max : from_t(thi)};
  if (axis.min && !axis.max && r.hi <= r.lo) r.hi = axis.log ? r.lo * 10 : r.lo + 1;
  if (axis.max && !axis.min && r.lo >= r.hi) r.lo = axis.log ? r.hi / 10 : r.hi - 1;
  MINIDL_CHECK(std::isfinite(r.lo) && std::isfinite(r.hi) && r.lo < r.hi, "plot: the ", which,
               " axis needs min < max, got [", r.lo, ", ", r.hi, "]");
  return r;
}

bool drawable(double v, bool log) { return std::isfinite(v) && (!log || v > 0); }

constexpr Color kInk = {40, 40, 40};
constexpr Color kGrid = {225, 225, 225};
constexpr Color kMinorGrid = {242, 242, 242};
constexpr int kTickScale = 2, kLabelScale = 2, kTitleScale = 3;
constexpr int kMajorTick = 6, kMinorTick = 3;

}  // namespace

std::string format_number(double value) {
  if (value == 0) return "0";
  if (!std::isfinite(value)) return std::isnan(value) ? "nan" : value > 0 ? "inf" : "-inf";
  const double magnitude = std::fabs(value);
  if (magnitude < 1e6 && value == std::round(value)) return fixed(value, 0);  // exact integers (N = 65536)
  int exponent = static_cast<int>(std::floor(std::log10(magnitude)));
  // Round to four significant digits first, which may carry into the next decade.
  const double rounded = std::round(value / std::pow(10.0, exponent - 3)) * std::pow(10.0, exponent - 3);
  if (rounded != 0) exponent = static_cast<int>(std::floor(std::log10(std::fabs(rounded)) + 1e-12));
  if (exponent >= -3 && exponent <= 5) return fixed(rounded, std::max(0, 3 - exponent));
  const double mantissa = rounded / std::pow(10.0, exponent);
  return fixed(mantissa, 3) + "e" + std::to_string(exponent);
}

std::vector<Tick> axis_ticks(double lo, double hi, bool log, int target) {
  MINIDL_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo < hi && (!log || lo > 0),
               "plot::axis_ticks: need finite lo < hi (positive on a log axis), got [", lo, ", ",
               hi, "]");
  return log ? log_ticks(lo, hi, target) : linear_ticks(lo, hi, target);
}

Image render(const Figure& fig) {
  for (const Series& s : fig.series)
    MINIDL_CHECK(s.x.size() == s.y.size(), "plot: series '", s.label, "' has ", s.x.size(),
                 " x values but ", s.y.size(), " y values");
  Image image(fig.width, fig.height);

  // Ranges over the drawable points.
  std::vector<double> xs, ys;
  for (const Series& s : fig.series)
    for (size_t i = 0; i < s.x.size(); ++i)
      if (drawable(s.x[i], fig.x.log) && drawable(s.y[i], fig.y.log)) {
        xs.push_back(s.x[i]);
        ys.push_back(s.y[i]);
      }
  const Range xr = axis_range(fig.x, xs, 0.0, "x");
  const Range yr = axis_range(fig.y, ys, 0.05, "y");
  auto ticks_for = [](const Axis& axis, const Range& r, int target) {
    if (axis.ticks.empty()) return axis_ticks(r.lo, r.hi, axis.log, target);
    std::vector<Tick> ticks;
    for (double v : axis.ticks)
      if (v >= r.lo && v <= r.hi) ticks.push_back({v, format_number(v)});
    return ticks;
  };
  const std::vector<Tick> xticks = ticks_for(fig.x, xr, 7);
  const std::vector<Tick> yticks = ticks_for(fig.y, yr, 6);

  // Layout: margins sized to the labels.
  int ytick_width = 0;
  for (const Tick& t : yticks) ytick_width = std::max(ytick_width, text_width(t.label, kTickScale));
  const int label_h = text_height(kLabelScale), tick_h = text_height(kTickScale);
  const int top = 16 + (fig.title.empty() ? 0 : text_height(kTitleScale) + 14);
  const int left = 14 + (fig.y.label.empty() ? 0 : label_h + 12) + ytick_width + 8 + kMajorTick;
  const int bottom = kMajorTick + 8 + tick_h + (fig.x.label.empty() ? 0 : 12 + label_h) + 14;
  int last_xlabel = 0;
  if (!xticks.empty()) last_xlabel = text_width(xticks.back().label, kTickScale) / 2;
  const int right = std::max(24, last_xlabel + 8);
  const Rect plot{left, top, fig.width - right, fig.height - bottom};
  MINIDL_CHECK(plot.width() >= 40 && plot.height() >= 40, "plot: a ", fig.width, " x ", fig.height,
               " figure leaves no room for the plot area; make it larger");

  auto frac = [](double v, double lo, double hi, bool log) {
    return log ? (std::log10(v) - std::log10(lo)) / (std::log10(hi) - std::log10(lo))
               : (v - lo) / (hi - lo);
  };
  auto px = [&](double v) { return plot.x0 + 0.5 + frac(v, xr.lo, xr.hi, fig.x.log) * (plot.width() - 1); };
  auto py = [&](double v) { return plot.y1 - 0.5 - frac(v, yr.lo, yr.hi, fig.y.log) * (plot.height() - 1); };

  // Grid.
  for (const Tick& t : xticks) {
    const int x = static_cast<int>(std::floor(px(t.value)));
    image.fill({x, plot.y0, x + 1, plot.y1}, t.label.empty() ? kMinorGrid : kGrid);
  }
  for (const Tick& t : yticks) {
    const int y = static_cast<int>(std::floor(py(t.value)));
    image.fill({plot.x0, y, plot.x1, y + 1}, t.label.empty() ? kMinorGrid : kGrid);
  }

  // Curves, each through its own coverage mask.
  for (size_t si = 0; si < fig.series.size(); ++si) {
    const Series& s = fig.series[si];
    StrokeMask mask(plot);
    bool have_previous = false;
    double prev_x = 0, prev_y = 0;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!drawable(s.x[i], fig.x.log) || !drawable(s.y[i], fig.y.log)) {
        have_previous = false;
        continue;
      }
      const double x = px(s.x[i]), y = py(s.y[i]);
      if (have_previous) mask.segment(prev_x, prev_y, x, y, s.line_width);
      else mask.dot(x, y, s.line_width / 2);
      if (s.markers) mask.dot(x, y, s.line_width * 1.6);
      prev_x = x, prev_y = y, have_previous = true;
    }
    mask.paint(image, s.color ? *s.color : palette(si));
  }

  // Frame, ticks and tick labels.
  image.outline({plot.x0 - 1, plot.y0 - 1, plot.x1 + 1, plot.y1 + 1}, kInk);
  for (const Tick& t : xticks) {
    const int x = static_cast<int>(std::floor(px(t.value)));
    const int len = t.label.empty() ? kMinorTick : kMajorTick;
    image.fill({x, plot.y1 + 1, x + 1, plot.y1 + 1 + len}, kInk);
    if (!t.label.empty())
      image.text(x - text_width(t.label, kTickScale) / 2, plot.y1 + 1 + kMajorTick + 8, t.label,
                 kTickScale, kInk);
  }
  for (const Tick& t : yticks) {
    const int y = static_cast<int>(std::floor(py(t.value)));
    const int len = t.label.empty() ? kMinorTick : kMajorTick;
    image.fill({plot.x0 - 1 - len, y, plot.x0 - 1, y + 1}, kInk);
    if (!t.label.empty())
      image.text(plot.x0 - 1 - kMajorTick - 8 - text_width(t.label, kTickScale), y - tick_h / 2,
                 t.label, kTickScale, kInk);
  }

  // Axis labels and title.
  if (!fig.x.label.empty())
    image.text(plot.x0 + (plot.width() - text_width(fig.x.label, kLabelScale)) / 2,
               plot.y1 + 1 + kMajorTick + 8 + tick_h + 12, fig.x.label, kLabelScale, kInk);
  if (!fig.y.label.empty())
    image.text_vertical(14, plot.y0 + (plot.height() + text_width(fig.y.label, kLabelScale)) / 2,
                        fig.y.label, kLabelScale, kInk);
  if (!fig.title.empty())
    image.text((fig.width - text_width(fig.title, kTitleScale)) / 2, 16, fig.title, kTitleScale, kInk);

  // Legend, in a plot corner that hides no curve; if every corner would,
  // right of the plot area, in a strip that widens the image.
  std::vector<size_t> labelled;
  int label_width = 0;
  for (size_t si = 0; si < fig.series.size(); ++si)
    if (!fig.series[si].label.empty()) {
      labelled.push_back(si);
      label_width = std::max(label_width, text_width(fig.series[si].label, kLabelScale));
    }
  if (!labelled.empty()) {
    const int row_h = label_h + 10, sample = 28, inset = 10;
    const int box_w = 10 + sample + 8 + label_width + 10;
    const int box_h = static_cast<int>(labelled.size()) * row_h + 8;
    const std::array<Rect, 4> corners = {{
        {plot.x1 - inset - box_w, plot.y0 + inset, plot.x1 - inset, plot.y0 + inset + box_h},
        {plot.x0 + inset, plot.y0 + inset, plot.x0 + inset + box_w, plot.y0 + inset + box_h},
        {plot.x1 - inset - box_w, plot.y1 - inset - box_h, plot.x1 - inset, plot.y1 - inset},
        {plot.x0 + inset, plot.y1 - inset - box_h, plot.x0 + inset + box_w, plot.y1 - inset},
    }};
    auto curve_pixels = [&](const Rect& r) {
      int count = 0;
      for (int y = std::max(r.y0, 0); y < std::min(r.y1, image.height()); ++y)
        for (int x = std::max(r.x0, 0); x < std::min(r.x1, image.width()); ++x) {
          const Color c = image.pixel(x, y);
          count += !(c.r == c.g && c.g == c.b);  // coloured: a curve, not the grey grid
        }
      return count;
    };
    Rect box = corners[0];
    int best = curve_pixels(box);
    for (size_t i = 1; i < corners.size() && best > 0; ++i) {
      const int n = curve_pixels(corners[i]);
      if (n < best) best = n, box = corners[i];
    }
    if (best > 0) {
      Image wide(fig.width + box_w + 2 * inset, fig.height);
      wide.draw(image, 0, 0);
      image = std::move(wide);
      box = {fig.width + inset, plot.y0, fig.width + inset + box_w, plot.y0 + box_h};
    }
    if (box.x0 >= plot.x0 && box.y1 <= plot.y1) {  // else the legend does not fit: leave it out
      image.fill(box, {255, 255, 255});
      image.outline(box, {170, 170, 170});
      for (size_t row = 0; row < labelled.size(); ++row) {
        const Series& s = fig.series[labelled[row]];
        const int cy = box.y0 + 4 + static_cast<int>(row) * row_h + row_h / 2;
        StrokeMask mask(box);
        mask.segment(box.x0 + 10, cy, box.x0 + 10 + sample, cy, s.line_width);
        if (s.markers) mask.dot(box.x0 + 10 + sample / 2.0, cy, s.line_width * 1.6);
        mask.paint(image, s.color ? *s.color : palette(labelled[row]));
        image.text(box.x0 + 10 + sample + 8, cy - label_h / 2, s.label, kLabelScale, kInk);
      }
    }
  }
  return image;
}

void save_png(const Figure& figure, const std::string& path) { render(figure).write_png(path); }

Image render_grid(const std::vector<Figure>& panels, int columns) {
  MINIDL_CHECK(!panels.empty(), "plot: render_grid needs at least one panel");
  MINIDL_CHECK(columns >= 1, "plot: render_grid needs columns >= 1, got ", columns);
  std::vector<Image> images;
  for (const Figure& f : panels) images.push_back(render(f));
  const size_t n = images.size(), cols = static_cast<size_t>(columns);
  std::vector<int> row_height((n + cols - 1) / cols, 0);
  int width = 0;
  for (size_t row = 0; row < row_height.size(); ++row) {
    int row_width = 0;
    for (size_t i = row * cols; i < std::min(n, (row + 1) * cols); ++i) {
      row_width += images[i].width();
      row_height[row] = std::max(row_height[row], images[i].height());
    }
    width = std::max(width, row_width);
  }
  int height = 0;
  for (int h : row_height) height += h;
  Image grid(width, height);
  int y = 0;
  for (size_t row = 0; row < row_height.size(); ++row) {
    int x = 0;
    for (size_t i = row * cols; i < std::min(n, (row + 1) * cols); ++i) {
      grid.draw(images[i], x, y);
      x += images[i].width();
    }
    y += row_height[row];
  }
  return grid;
}

void save_png(const std::vector<Figure>& panels, int columns, const std::string& path) {
  render_grid(panels, columns).write_png(path);
}

}  // namespace minidl::plot
