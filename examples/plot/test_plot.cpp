// The plot library: number labels, axis ticks, and rendered images.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "plot/font.h"
#include "plot/plot.h"

using namespace minidl::plot;

namespace {

std::vector<double> values(const std::vector<Tick>& ticks, bool labelled_only = true) {
  std::vector<double> out;
  for (const Tick& t : ticks)
    if (!labelled_only || !t.label.empty()) out.push_back(t.value);
  return out;
}

std::vector<std::string> labels(const std::vector<Tick>& ticks) {
  std::vector<std::string> out;
  for (const Tick& t : ticks)
    if (!t.label.empty()) out.push_back(t.label);
  return out;
}

int count_color(const Image& image, Color c, const Rect& r) {
  int n = 0;
  for (int y = r.y0; y < r.y1; ++y)
    for (int x = r.x0; x < r.x1; ++x) n += image.pixel(x, y) == c;
  return n;
}

}  // namespace

TEST_CASE("format_number: plain in [0.001, 1e6), else mantissa and exponent; four significant digits") {
  CHECK(format_number(0) == "0");
  CHECK(format_number(2.5) == "2.5");
  CHECK(format_number(-0.02) == "-0.02");
  CHECK(format_number(65536) == "65536");
  CHECK(format_number(0.001) == "0.001");
  CHECK(format_number(1e6) == "1e6");
  CHECK(format_number(1048576) == "1.049e6");
  CHECK(format_number(2.5e-5) == "2.5e-5");
  CHECK(format_number(1.23456) == "1.235");
  CHECK(format_number(123456.7) == "123500");
  CHECK(format_number(9.99999) == "10");  // rounding carries into the next decade
}

TEST_CASE("palette: twenty distinct colours, then the cycle repeats") {
  for (size_t i = 0; i < 20; ++i)
    for (size_t j = 0; j < i; ++j) CHECK_FALSE(palette(i) == palette(j));
  CHECK(palette(20) == palette(0));
  CHECK(palette(27) == palette(7));
}

TEST_CASE("linear ticks: 1, 2 or 5 x 10^k steps inside the range") {
  CHECK(values(axis_ticks(0, 5000, false, 6)) == std::vector<double>{0, 1000, 2000, 3000, 4000, 5000});
  CHECK(labels(axis_ticks(0, 5000, false, 6)) ==
        std::vector<std::string>{"0", "1000", "2000", "3000", "4000", "5000"});
  CHECK(labels(axis_ticks(1.38, 4.21, false, 6)) ==
        std::vector<std::string>{"1.5", "2.0", "2.5", "3.0", "3.5", "4.0"});
  CHECK(labels(axis_ticks(-0.1, 0.1, false, 4)) == std::vector<std::string>{"-0.10", "-0.05", "0", "0.05", "0.10"});
}

TEST_CASE("log ticks: decades with minor ticks, thinned decades, 1-2-5 for narrow spans") {
  // N from 1024 to 1048576: decades 1e4, 1e5, 1e6 labelled, 2..9 x 10^k minor.
  auto ticks = axis_ticks(1024, 1048576, true, 6);
  CHECK(labels(ticks) == std::vector<std::string>{"10000", "100000", "1e6"});
  CHECK(values(ticks, false).size() > 10);
  // Thirteen decades with a target of 6: every third decade labelled.
  CHECK(labels(axis_ticks(1e-3, 1e9, true, 6)) ==
        std::vector<std::string>{"0.001", "1", "1000", "1e6", "1e9"});
  // Under two decades: 1, 2, 5 x 10^k.
  CHECK(labels(axis_ticks(0.8, 30, true, 6)) == std::vector<std::string>{"1", "2", "5", "10", "20"});
  // Under a factor of three: linear ticks.
  CHECK(labels(axis_ticks(1.3, 2.9, true, 6)) == std::vector<std::string>{"1.5", "2.0", "2.5"});
  CHECK_THROWS_WITH_AS(axis_ticks(0, 10, true), doctest::Contains("positive on a log axis"), minidl::Error);
}

TEST_CASE("the font has distinct glyphs for the digits") {
  for (char a = '0'; a <= '9'; ++a)
    for (char b = a + 1; b <= '9'; ++b)
      CHECK(!std::equal(glyph(a), glyph(a) + kGlyphRows, glyph(b)));
  CHECK(std::equal(glyph('\x01'), glyph('\x01') + kGlyphRows, glyph('?')));
}

TEST_CASE("render draws the curves in their colours, inside the frame, with a legend") {
  Figure fig;
  fig.title = "loss";
  fig.x.label = "step";
  fig.y.label = "loss";
  Series train{.label = "train", .x = {0, 100, 200, 300}, .y = {4.2, 2.5, 2.0, 1.8}};
  Series val{.label = "val", .x = {0, 300}, .y = {4.1, 1.9}, .markers = true};
  fig.series = {train, val};
  const Image image = render(fig);
  CHECK(image.width() == 900);
  CHECK(image.height() == 560);
  const Rect all{0, 0, image.width(), image.height()};
  // Solid curve pixels in both palette colours (the legend samples count too).
  CHECK(count_color(image, palette(0), all) > 300);
  CHECK(count_color(image, palette(1), all) > 100);
  // Text and frame in the ink colour; the top-left corner stays background.
  CHECK(count_color(image, {40, 40, 40}, all) > 1000);
  CHECK(image.pixel(2, 2) == Color{255, 255, 255});
}

TEST_CASE("a legend that would hide curves in every corner goes right of the plot area") {
  Figure fig;
  // Two diagonals and two flat lines along the top and bottom edges: every corner is crossed.
  fig.series = {{.label = "up", .x = {0, 1}, .y = {0, 1}},
                {.label = "down", .x = {0, 1}, .y = {1, 0}},
                {.label = "top", .x = {0, 1}, .y = {0.97, 0.97}},
                {.label = "bottom", .x = {0, 1}, .y = {0.03, 0.03}}};
  const Image crowded = render(fig);
  CHECK(crowded.width() > fig.width);
  CHECK(crowded.height() == fig.height);
  // The strip holds the legend: its samples in the series' colours.
  const Rect strip{fig.width, 0, crowded.width(), crowded.height()};
  for (size_t i = 0; i < fig.series.size(); ++i) CHECK(count_color(crowded, palette(i), strip) > 20);
  // A figure with a free corner keeps its size.
  fig.series.resize(1);
  CHECK(render(fig).width() == fig.width);
}

TEST_CASE("log-log axes skip non-positive points; non-finite points break the line") {
  Figure fig;
  fig.x.log = fig.y.log = true;
  fig.series.push_back({.label = "time", .x = {1024, 0, 4096, 16384, 65536}, .y = {0.1, 1, -1, 2.0, NAN}});
  const Image image = render(fig);
  CHECK(count_color(image, palette(0), {0, 0, image.width(), image.height()}) > 50);
}

TEST_CASE("explicit ticks replace the automatic ones") {
  Figure fig;
  fig.x.log = true;
  fig.x.ticks = {512, 1024, 4096, 16384, 1 << 20};  // 512 and 2^20 lie outside the data
  fig.series.push_back({.x = {1024, 16384}, .y = {1, 2}});
  Figure automatic = fig;
  automatic.x.ticks.clear();
  const Image a = render(fig), b = render(automatic);
  CHECK(a.rgb() != b.rgb());
}

TEST_CASE("errors name the problem") {
  Figure fig;
  fig.series.push_back({.label = "bad", .x = {1, 2}, .y = {1}});
  CHECK_THROWS_WITH_AS(render(fig), doctest::Contains("series 'bad' has 2 x values but 1 y values"),
                       minidl::Error);
  Figure log_fig;
  log_fig.y.log = true;
  log_fig.y.min = 0.0;
  CHECK_THROWS_WITH_AS(render(log_fig), doctest::Contains("y axis is logarithmic"), minidl::Error);
  Figure tiny;
  tiny.width = 60;
  tiny.height = 40;
  CHECK_THROWS_WITH_AS(render(tiny), doctest::Contains("leaves no room"), minidl::Error);
  Figure empty;  // no data: a frame with default ranges
  CHECK(render(empty).width() == 900);
}

TEST_CASE("render_grid places the panels row by row, each as render() draws it") {
  Figure a, b, c;
  a.series.push_back({.label = "a", .x = {1, 2, 3}, .y = {3, 1, 2}});
  b.series.push_back({.label = "b", .x = {1, 2}, .y = {5, 6}});
  c = a;
  c.width = 400;
  c.height = 300;
  const Image grid = render_grid({a, b, c}, 2);
  CHECK(grid.width() == 1800);
  CHECK(grid.height() == 560 + 300);
  const Image ra = render(a), rb = render(b), rc = render(c);
  for (auto [x, y] : {std::pair{100, 100}, std::pair{450, 280}, std::pair{899, 559}}) {
    CHECK(grid.pixel(x, y) == ra.pixel(x, y));
    CHECK(grid.pixel(900 + x, y) == rb.pixel(x, y));
  }
  CHECK(grid.pixel(200, 560 + 150) == rc.pixel(200, 150));
  CHECK(grid.pixel(1000, 560 + 150) == Color{255, 255, 255});  // no fourth panel
  CHECK_THROWS_WITH_AS(render_grid({}, 2), doctest::Contains("at least one panel"), minidl::Error);
  CHECK_THROWS_WITH_AS(render_grid({a}, 0), doctest::Contains("columns >= 1, got 0"), minidl::Error);
}

TEST_CASE("save_png writes a PNG file atomically") {
  const auto path = std::filesystem::temp_directory_path() / ("minidl_plot_" + std::to_string(::getpid()) + ".png");
  Figure fig;
  fig.series.push_back({.label = "a", .x = {1, 2, 3}, .y = {3, 1, 2}});
  save_png(fig, path.string());
  std::ifstream in(path, std::ios::binary);
  char magic[8] = {};
  in.read(magic, 8);
  CHECK(std::string(magic + 1, 3) == "PNG");
  CHECK(!std::filesystem::exists(path.string() + ".tmp"));
  std::filesystem::remove(path);
  CHECK_THROWS_WITH_AS(save_png(fig, "/nonexistent-dir/x.png"), doctest::Contains("/nonexistent-dir/x.png"),
                       minidl::Error);
}
