#include "plot/canvas.h"

#include <stb/stb_image_write.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "plot/font.h"

namespace minidl::plot {

Image::Image(int width, int height, Color background) : width_(width), height_(height) {
  MINIDL_CHECK(width > 0 && height > 0 && width <= 16384 && height <= 16384,
               "plot::Image: size must be in [1, 16384], got ", width, " x ", height);
  rgb_.resize(static_cast<size_t>(width) * height * 3);
  for (size_t i = 0; i < rgb_.size(); i += 3) {
    rgb_[i] = background.r;
    rgb_[i + 1] = background.g;
    rgb_[i + 2] = background.b;
  }
}

Color Image::pixel(int x, int y) const {
  MINIDL_CHECK(x >= 0 && y >= 0 && x < width_ && y < height_, "plot::Image::pixel: (", x, ", ", y,
               ") is outside the ", width_, " x ", height_, " image");
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  return {rgb_[i], rgb_[i + 1], rgb_[i + 2]};
}

void Image::set(int x, int y, Color c) { blend(x, y, c, 1.0f); }

void Image::blend(int x, int y, Color c, float alpha) {
  if (x < 0 || y < 0 || x >= width_ || y >= height_ || !(alpha > 0)) return;
  alpha = std::min(alpha, 1.0f);
  uint8_t* p = &rgb_[(static_cast<size_t>(y) * width_ + x) * 3];
  auto mix = [alpha](uint8_t old, uint8_t add) {
    return static_cast<uint8_t>(std::lround(old + (static_cast<float>(add) - old) * alpha));
  };
  p[0] = mix(p[0], c.r);
  p[1] = mix(p[1], c.g);
  p[2] = mix(p[2], c.b);
}

void Image::fill(const Rect& r, Color c) {
  for (int y = std::max(r.y0, 0); y < std::min(r.y1, height_); ++y)
    for (int x = std::max(r.x0, 0); x < std::min(r.x1, width_); ++x) set(x, y, c);
}

void Image::outline(const Rect& r, Color c) {
  fill({r.x0, r.y0, r.x1, r.y0 + 1}, c);
  fill({r.x0, r.y1 - 1, r.x1, r.y1}, c);
  fill({r.x0, r.y0, r.x0 + 1, r.y1}, c);
  fill({r.x1 - 1, r.y0, r.x1, r.y1}, c);
}

void Image::draw(const Image& source, int x, int y) {
  for (int sy = 0; sy < source.height(); ++sy)
    for (int sx = 0; sx < source.width(); ++sx) set(x + sx, y + sy, source.pixel(sx, sy));
}

int text_width(const std::string& s, int scale) {
  return s.empty() ? 0 : static_cast<int>(s.size()) * (kGlyphColumns + 1) * scale - scale;
}

int text_height(int scale) { return kGlyphRows * scale; }

void Image::text(int x, int y, const std::string& s, int scale, Color c) {
  for (size_t i = 0; i < s.size(); ++i) {
    const uint8_t* rows = glyph(s[i]);
    const int left = x + static_cast<int>(i) * (kGlyphColumns + 1) * scale;
    for (int gy = 0; gy < kGlyphRows; ++gy)
      for (int gx = 0; gx < kGlyphColumns; ++gx)
        if (rows[gy] & (1 << (kGlyphColumns - 1 - gx)))
          fill({left + gx * scale, y + gy * scale, left + (gx + 1) * scale, y + (gy + 1) * scale}, c);
  }
}

void Image::text_vertical(int x, int y, const std::string& s, int scale, Color c) {
  // A quarter turn counter-clockwise: the glyph's "right" points up and its
  // "down" points right, so glyph pixel (gx, gy) lands at (x + gy, y - gx).
  for (size_t i = 0; i < s.size(); ++i) {
    const uint8_t* rows = glyph(s[i]);
    const int bottom = y - static_cast<int>(i) * (kGlyphColumns + 1) * scale;
    for (int gy = 0; gy < kGlyphRows; ++gy)
      for (int gx = 0; gx < kGlyphColumns; ++gx)
        if (rows[gy] & (1 << (kGlyphColumns - 1 - gx)))
          fill({x + gy * scale, bottom - (gx + 1) * scale, x + (gy + 1) * scale, bottom - gx * scale}, c);
  }
}

void Image::write_png(const std::string& path) const {
  // Written beside the target and renamed over it, so a reader (or a crash)
  // never sees half a PNG.
  const std::string tmp = path + ".tmp";
  const int ok = stbi_write_png(tmp.c_str(), width_, height_, 3, rgb_.data(), width_ * 3);
  if (!ok) {
    std::remove(tmp.c_str());
    MINIDL_FAIL("plot: cannot write PNG '", path, "'");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    MINIDL_FAIL("plot: cannot write PNG '", path, "': ", ec.message());
  }
}

// ---- StrokeMask ----

StrokeMask::StrokeMask(const Rect& clip) : clip_(clip) {
  coverage_.assign(static_cast<size_t>(std::max(clip.width(), 0)) * std::max(clip.height(), 0), 0.0f);
}

void StrokeMask::cover(int x, int y, float coverage) {
  if (x < clip_.x0 || y < clip_.y0 || x >= clip_.x1 || y >= clip_.y1 || coverage <= 0) return;
  float& c = coverage_[static_cast<size_t>(y - clip_.y0) * clip_.width() + (x - clip_.x0)];
  c = std::max(c, std::min(coverage, 1.0f));
}

void StrokeMask::segment(double ax, double ay, double bx, double by, double width) {
  // Pixel centres within half the width of the segment are covered; the
  // last half pixel ramps linearly (anti-aliasing). Far-away coordinates are
  // clamped so the bounding box stays finite.
  auto clamp = [](double v) { return std::clamp(v, -1e6, 1e6); };
  ax = clamp(ax), ay = clamp(ay), bx = clamp(bx), by = clamp(by);
  const double half = width / 2;
  const int x0 = std::max(clip_.x0, static_cast<int>(std::floor(std::min(ax, bx) - half - 1)));
  const int x1 = std::min(clip_.x1 - 1, static_cast<int>(std::ceil(std::max(ax, bx) + half + 1)));
  const int y0 = std::max(clip_.y0, static_cast<int>(std::floor(std::min(ay, by) - half - 1)));
  const int y1 = std::min(clip_.y1 - 1, static_cast<int>(std::ceil(std::max(ay, by) + half + 1)));
  const double dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy;
  for (int y = y0; y <= y1; ++y) {
    for (int x = x0; x <= x1; ++x) {
      const double px = x + 0.5 - ax, py = y + 0.5 - ay;
      const double t = len2 > 0 ? std::clamp((px * dx + py * dy) / len2, 0.0, 1.0) : 0.0;
      const double ex = px - t * dx, ey = py - t * dy;
      const double distance = std::sqrt(ex * ex + ey * ey);
      cover(x, y, static_cast<float>(half + 0.5 - distance));
    }
  }
}

void StrokeMask::dot(double x, double y, double radius) { segment(x, y, x, y, 2 * radius); }

void StrokeMask::paint(Image& image, Color c) const {
  for (int y = clip_.y0; y < clip_.y1; ++y)
    for (int x = clip_.x0; x < clip_.x1; ++x)
      image.blend(x, y, c, coverage_[static_cast<size_t>(y - clip_.y0) * clip_.width() + (x - clip_.x0)]);
}

}  // namespace minidl::plot
