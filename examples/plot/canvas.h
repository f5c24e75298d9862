#pragma once
// An RGB raster with the few primitives the plots need: filled rectangles,
// anti-aliased thick polylines (drawn through a coverage mask, so joints of
// one curve do not darken where its segments overlap), and bitmap text,
// horizontal or rotated a quarter turn for y-axis labels.
#include <cstdint>
#include <string>
#include <vector>

namespace minidl::plot {

struct Color {
  uint8_t r = 0, g = 0, b = 0;
  friend bool operator==(const Color&, const Color&) = default;
};

struct Rect {
  int x0 = 0, y0 = 0, x1 = 0, y1 = 0;  // [x0, x1) x [y0, y1)
  int width() const { return x1 - x0; }
  int height() const { return y1 - y0; }
};

class Image {
 public:
  Image(int width, int height, Color background = {255, 255, 255});
  int width() const { return width_; }
  int height() const { return height_; }
  Color pixel(int x, int y) const;
  // Row-major RGB, 3 bytes per pixel.
  const std::vector<uint8_t>& rgb() const { return rgb_; }

  void set(int x, int y, Color c);  // ignores pixels outside the image
  // Mixes `c` into the pixel with weight alpha in [0, 1].
  void blend(int x, int y, Color c, float alpha);
  void fill(const Rect& r, Color c);
  // A 1-pixel outline just inside r.
  void outline(const Rect& r, Color c);
  // Copies `source` with its top-left corner at (x, y); pixels falling
  // outside this image are dropped.
  void draw(const Image& source, int x, int y);

  // Text with its top-left corner at (x, y), each font pixel scale x scale.
  void text(int x, int y, const std::string& s, int scale, Color c);
  // Text reading bottom to top (rotated 90 degrees counter-clockwise),
  // starting at (x, y) = its bottom-left corner.
  void text_vertical(int x, int y, const std::string& s, int scale, Color c);

  // Writes a PNG (stb_image_write). Throws minidl::Error naming the path.
  void write_png(const std::string& path) const;

 private:
  int width_, height_;
  std::vector<uint8_t> rgb_;
};

// Size of s drawn at `scale`: one blank font column between characters.
int text_width(const std::string& s, int scale);
int text_height(int scale);

// Accumulates the coverage of thick lines and dots, then paints it once.
class StrokeMask {
 public:
  // Only pixels inside `clip` are covered.
  explicit StrokeMask(const Rect& clip);
  // A segment of the given width with round caps (a dot when a == b).
  void segment(double ax, double ay, double bx, double by, double width);
  void dot(double x, double y, double radius);
  void paint(Image& image, Color c) const;

 private:
  void cover(int x, int y, float coverage);
  Rect clip_;
  std::vector<float> coverage_;
};

}  // namespace minidl::plot
