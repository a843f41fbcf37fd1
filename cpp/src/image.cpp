// PNG (libpng) and JPEG (libjpeg-turbo) decoding with Pillow's convert("RGB") semantics.
// Both libraries report errors by longjmp: each decoder keeps C++ objects with destructors out of the
// frames it jumps across, and throws only after the library state is released.
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "nearl/error.hpp"
#include "nearl/image.hpp"

namespace nearl {
namespace {

// ---- JPEG ----

struct JpegErrors {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrors*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// Warnings are ignored (as Pillow does) except a premature end of data, which Pillow refuses as truncated.
void jpeg_message(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_fail(cinfo);
}

// Returns "" on success, else the reason; `out` then holds the pixels.
std::string decode_jpeg(const std::uint8_t* data, std::size_t size, Image& out) {
  jpeg_decompress_struct cinfo;
  JpegErrors err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_message;
  err.message[0] = '\0';
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return std::string("corrupt or truncated JPEG (") + err.message + ")";
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, const_cast<unsigned char*>(data), static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    return "CMYK JPEGs are not supported (convert the image to RGB)";
  }
  cinfo.out_color_space = cinfo.jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  out.width = static_cast<int>(cinfo.output_width);
  out.height = static_cast<int>(cinfo.output_height);
  out.channels = cinfo.output_components;
  out.pixels.resize(std::size_t(out.width) * out.height * out.channels);
  const std::size_t stride = std::size_t(out.width) * out.channels;
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = out.pixels.data() + cinfo.output_scanline * stride;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return "";
}

// ---- PNG ----

struct PngSource {
  const std::uint8_t* data;
  std::size_t size, pos;
  char message[256];
};

void png_fail(png_structp png, png_const_charp message) {
  auto* src = static_cast<PngSource*>(png_get_error_ptr(png));
  std::snprintf(src->message, sizeof(src->message), "%s", message);
  png_longjmp(png, 1);
}

void png_ignore_warning(png_structp, png_const_charp) {}

void png_read_memory(png_structp png, png_bytep out, png_size_t n) {
  auto* src = static_cast<PngSource*>(png_get_io_ptr(png));
  if (n > src->size - src->pos) png_error(png, "unexpected end of data");
  std::memcpy(out, src->data + src->pos, n);
  src->pos += n;
}

std::string decode_png(const std::uint8_t* data, std::size_t size, Image& out) {
  PngSource src{data, size, 0, {0}};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &src, png_fail, png_ignore_warning);
  if (!png) return "out of memory";
  png_infop info = png_create_info_struct(png);
  std::vector<png_bytep>* volatile rows = nullptr;  // heap, volatile: survives the jump
  if (!info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    delete rows;
    return std::string("corrupt or truncated PNG (") + src.message + ")";
  }
  png_set_read_fn(png, &src, png_read_memory);
  png_read_info(png, info);
  const int depth = png_get_bit_depth(png, info), type = png_get_color_type(png, info);
  if (depth == 16) {
    png_destroy_read_struct(&png, &info, nullptr);
    return "16-bit PNGs are not supported: Pillow's convert(\"RGB\") clips them at 255; convert them to 8 bits "
           "the way the training images were and pass the pixels";
  }
  if (type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (type == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  png_set_strip_alpha(png);  // alpha channels, and the alpha palette expansion makes from tRNS
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out.width = static_cast<int>(png_get_image_width(png, info));
  out.height = static_cast<int>(png_get_image_height(png, info));
  out.channels = png_get_channels(png, info);
  out.pixels.resize(std::size_t(out.width) * out.height * out.channels);
  rows = new std::vector<png_bytep>(out.height);
  for (int y = 0; y < out.height; ++y) (*rows)[y] = out.pixels.data() + std::size_t(y) * out.width * out.channels;
  png_read_image(png, rows->data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  delete rows;
  return "";
}

}  // namespace

Image decode_image(const std::uint8_t* data, std::size_t size) {
  static const std::uint8_t png_signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (!data || size == 0) throw Error("cannot decode an empty buffer: pass the bytes of a PNG or JPEG file");
  Image image;
  std::string problem;
  if (size >= 8 && std::memcmp(data, png_signature, 8) == 0) problem = decode_png(data, size, image);
  else if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) problem = decode_jpeg(data, size, image);
  else problem = "not a PNG or JPEG image (unknown signature)";
  if (!problem.empty()) throw Error("cannot decode image: " + problem);
  if (image.channels != 1 && image.channels != 3)
    throw Error("cannot decode image: " + std::to_string(image.channels) + " channels after decoding");
  return image;
}

Image decode_image(const std::vector<std::uint8_t>& bytes) { return decode_image(bytes.data(), bytes.size()); }

Image read_image(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("image not found or unreadable: " + path);
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  try {
    return decode_image(bytes);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

}  // namespace nearl
