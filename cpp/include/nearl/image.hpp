// Decoded 8-bit images, and PNG / JPEG decoding (libpng, libjpeg-turbo) that yields the pixels Pillow's
// Image.open(...).convert("RGB") gives (bit-identical; tests/test_cpp_library.py checks it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace nearl {

// A caller-owned uint8 image: `height` rows of `width` pixels of `channels` bytes, packed (row stride =
// width * channels). channels: 3 = RGB, 1 = grayscale (replicated to RGB, as Pillow's convert("RGB")).
struct ImageView {
  const std::uint8_t* pixels = nullptr;
  int height = 0;
  int width = 0;
  int channels = 3;
};

// An image that owns its pixels (what the decoders return).
struct Image {
  int height = 0;
  int width = 0;
  int channels = 0;  // 3 (RGB) or 1 (grayscale)
  std::vector<std::uint8_t> pixels;

  ImageView view() const { return ImageView{pixels.data(), height, width, channels}; }
};

// PNG or JPEG bytes -> pixels. Grayscale stays one channel; alpha is dropped (not composited) and
// palettes are expanded, as Pillow's convert("RGB") does; EXIF orientation and PNG gamma are ignored (as
// Pillow). Throws nearl::Error for anything else: not PNG/JPEG, truncated or corrupt data, 16-bit PNGs
// (Pillow would clip them at 255: convert them the way the training images were), CMYK JPEGs.
Image decode_image(const std::uint8_t* data, std::size_t size);
Image decode_image(const std::vector<std::uint8_t>& bytes);

// The file's bytes, decoded as decode_image (errors name the file).
Image read_image(const std::string& path);

}  // namespace nearl
