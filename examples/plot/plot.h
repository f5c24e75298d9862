#pragma once
// Line plots as PNG files, drawn by a small rasteriser (plot/canvas.h) with a
// built-in bitmap font, written with stb_image_write. Linear or log10 axes
// with "nice" ticks, tick labels, axis labels, a title and a legend. Used by
// charlm (loss curves) and the benchmarks (time vs N on log-log axes).
//
//   plot::Figure fig;
//   fig.title = "loss";
//   fig.x.label = "step";
//   fig.y.label = "loss";
//   fig.series.push_back({.label = "train", .x = steps, .y = train_loss});
//   fig.series.push_back({.label = "val", .x = eval_steps, .y = val_loss, .markers = true});
//   plot::save_png(fig, "loss.png");
#include <optional>
#include <string>
#include <vector>

#include "plot/canvas.h"

namespace minidl::plot {

struct Series {
  std::string label;  // shown in the legend (series with no label are left out of it)
  // Points in drawing order; x and y have the same length. A point that is
  // not finite (or not positive on a log axis) is skipped and breaks the line.
  std::vector<double> x, y;
  std::optional<Color> color;  // default: palette(index of the series)
  bool markers = false;        // a dot at each point (for sparse series)
  double line_width = 2.0;     // pixels
};

struct Axis {
  std::string label;
  bool log = false;  // log10 scale; ticks at 1, 2, 5 x 10^k (or decades)
  // The visible range; each defaults to the data's range (the y axis gets a
  // small margin). On a log axis both must be positive.
  std::optional<double> min, max;
  // Explicit major ticks (e.g. powers of two for N), labelled with
  // format_number; those outside the range are dropped. Empty: automatic.
  std::vector<double> ticks;
};

struct Figure {
  std::string title;
  Axis x, y;
  std::vector<Series> series;
  int width = 900, height = 560;  // pixels
};

// Distinguishable line colours: blue, orange, green, red, purple, ... (twenty,
// then the cycle repeats).
Color palette(size_t index);

struct Tick {
  double value;
  std::string label;  // empty for minor ticks
};

// The ticks of an axis showing [lo, hi] (lo < hi; both positive when log),
// major ticks labelled, in increasing order. Linear: 1, 2 or 5 x 10^k steps,
// about `target` of them. Log: decades (every n-th when there are many, with
// unlabelled minor ticks at 2..9 x 10^k when few), 1-2-5 ticks for spans of
// under two decades, linear ticks for spans of under a factor of three.
std::vector<Tick> axis_ticks(double lo, double hi, bool log, int target = 6);

// The value as a short label: integers below 1e6 exactly ("65536"), else
// four significant digits, plain between 0.001 and 999999 ("2.5", "-0.02"),
// with an exponent outside ("1e-6", "2.5e9").
std::string format_number(double value);

// Draws the figure. Throws minidl::Error when series have mismatched x/y
// lengths, the size is out of range, or a log axis is given a non-positive
// min or max. A figure without drawable points still gets its frame. The
// legend goes in the plot area's corner that hides no curve; when every
// corner would, it goes right of the plot area instead, and the image is
// that much wider than figure.width.
Image render(const Figure& figure);
// render() then Image::write_png (atomically: written aside, then renamed).
void save_png(const Figure& figure, const std::string& path);

// Several figures as panels of one image, `columns` to a row, filled left to
// right then top to bottom; each panel keeps its own width and height, and a
// row is as tall as its tallest panel. Throws minidl::Error for no panels or
// columns < 1, and whatever render() throws for a panel.
Image render_grid(const std::vector<Figure>& panels, int columns);
void save_png(const std::vector<Figure>& panels, int columns, const std::string& path);

}  // namespace minidl::plot
