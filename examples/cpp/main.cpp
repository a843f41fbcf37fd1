// nearl_client: run an exported NEARL-CLIP (python -m export.onnx) with the onnxruntime C++ API.
//
//   nearl_client MODEL.onnx [--top-k K] INPUT...
//
// INPUT is a binary PPM (P6, maxval 255) of the model's input size, normalised here with the mean/std
// stored in the model; or a raw little-endian float32 file (any other extension) holding
// [n, 3, H, W] images already preprocessed. All inputs run as one batch. The class names come from
// the model's metadata. Output: one line per image and rank, "<image> <rank> <probability> <class name>".
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

// Reads the JSON values export.onnx writes into the metadata: flat arrays of strings or numbers.
class JsonArray {
 public:
  explicit JsonArray(std::string text) : s_(std::move(text)) {}

  std::vector<std::string> strings() {
    std::vector<std::string> out;
    items([&] { out.push_back(string()); });
    return out;
  }
  std::vector<double> numbers() {
    std::vector<double> out;
    items([&] {
      size_t used = 0;
      out.push_back(std::stod(s_.substr(i_), &used));
      i_ += used;
    });
    return out;
  }

 private:
  template <class F>
  void items(F item) {
    expect('[');
    if (peek() == ']') { ++i_; return; }
    for (;;) {
      skip();
      item();
      char c = next();
      if (c == ']') return;
      if (c != ',') fail("bad JSON array in the model metadata: " + s_);
    }
  }
  void skip() { while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_; }
  char peek() { skip(); if (i_ >= s_.size()) fail("truncated JSON in the model metadata: " + s_); return s_[i_]; }
  char next() { char c = peek(); ++i_; return c; }
  void expect(char c) { if (next() != c) fail(std::string("expected '") + c + "' in the model metadata: " + s_); }
  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape in the model metadata");
    unsigned v = std::stoul(s_.substr(i_, 4), nullptr, 16);
    i_ += 4;
    return v;
  }
  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) { out += char(cp); }
    else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) { out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F)); }
    else { out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F)); }
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) break;
      char e = s_[i_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {  // surrogate pair
            i_ += 2;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (hex4() - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: out += e;  // \" \\ \/
      }
    }
    expect('"');
    return out;
  }
  std::string s_;
  size_t i_ = 0;
};

struct ModelInfo {
  std::vector<std::string> classes;
  int64_t height = 0, width = 0;
  std::vector<double> mean, std;
};

ModelInfo read_metadata(Ort::Session& session, const std::string& path) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::ModelMetadata meta = session.GetModelMetadata();
  auto get = [&](const char* key) {
    Ort::AllocatedStringPtr value = meta.LookupCustomMetadataMapAllocated(key, alloc);
    if (!value) fail(path + " has no '" + key + "' metadata: export it with python -m export.onnx");
    return std::string(value.get());
  };
  ModelInfo info;
  info.classes = JsonArray(get("nearl.class_names")).strings();
  std::vector<double> size = JsonArray(get("nearl.input_size")).numbers();
  info.mean = JsonArray(get("nearl.mean")).numbers();
  info.std = JsonArray(get("nearl.std")).numbers();
  if (info.classes.empty() || size.size() != 2 || info.mean.size() != 3 || info.std.size() != 3)
    fail(path + " has malformed nearl.* metadata");
  info.height = static_cast<int64_t>(size[0]);
  info.width = static_cast<int64_t>(size[1]);
  return info;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A binary PPM of exactly the model's input size -> normalised float32 [3, H, W], appended to `out`.
void read_ppm(const std::string& path, const ModelInfo& info, std::vector<float>& out) {
  std::vector<char> data = read_file(path);
  size_t i = 0;
  auto token = [&]() {
    for (;;) {
      while (i < data.size() && std::isspace(static_cast<unsigned char>(data[i]))) ++i;
      if (i < data.size() && data[i] == '#') { while (i < data.size() && data[i] != '\n') ++i; continue; }
      break;
    }
    std::string t;
    while (i < data.size() && !std::isspace(static_cast<unsigned char>(data[i]))) t += data[i++];
    return t;
  };
  if (token() != "P6") fail(path + " is not a binary PPM (P6)");
  long w = std::stol(token()), h = std::stol(token()), maxval = std::stol(token());
  ++i;  // the single whitespace byte before the pixels
  if (maxval != 255) fail(path + ": only 8-bit PPM (maxval 255) is supported");
  if (w != info.width || h != info.height)
    fail(path + " is " + std::to_string(w) + "x" + std::to_string(h) + "; the model needs " + std::to_string(info.width) +
         "x" + std::to_string(info.height) + " (resize and crop it as export.preprocess does, or pass raw float32)");
  if (data.size() < i + size_t(3 * w * h)) fail(path + " is truncated");
  const unsigned char* px = reinterpret_cast<const unsigned char*>(data.data() + i);
  size_t base = out.size();
  out.resize(base + size_t(3 * w * h));
  for (int c = 0; c < 3; ++c)
    for (long p = 0; p < w * h; ++p)
      out[base + size_t(c * w * h + p)] =
          (static_cast<float>(px[3 * p + c]) / 255.0f - static_cast<float>(info.mean[c])) / static_cast<float>(info.std[c]);
}

// Raw float32 [n, 3, H, W] -> appended to `out`; returns n.
int64_t read_raw(const std::string& path, const ModelInfo& info, std::vector<float>& out) {
  std::vector<char> data = read_file(path);
  size_t image_bytes = size_t(3 * info.height * info.width) * sizeof(float);
  if (data.empty() || data.size() % image_bytes != 0)
    fail(path + " holds " + std::to_string(data.size()) + " bytes, not a whole number of float32 [3, " +
         std::to_string(info.height) + ", " + std::to_string(info.width) + "] images");
  size_t base = out.size();
  out.resize(base + data.size() / sizeof(float));
  std::copy(data.begin(), data.end(), reinterpret_cast<char*>(out.data() + base));
  return static_cast<int64_t>(data.size() / image_bytes);
}

int run(int argc, char** argv) {
  std::string model_path;
  std::vector<std::string> inputs;
  size_t top_k = 5;
  for (int a = 1; a < argc; ++a) {
    std::string arg = argv[a];
    if (arg == "--top-k" && a + 1 < argc) top_k = std::stoul(argv[++a]);
    else if (model_path.empty()) model_path = arg;
    else inputs.push_back(arg);
  }
  if (model_path.empty() || inputs.empty() || top_k == 0)
    fail("usage: nearl_client MODEL.onnx [--top-k K] INPUT.ppm|INPUT.f32 ...");

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "nearl_client");
  Ort::SessionOptions options;
  Ort::Session session(env, model_path.c_str(), options);
  ModelInfo info = read_metadata(session, model_path);

  std::vector<float> batch;
  int64_t n = 0;
  for (const std::string& path : inputs) {
    if (ends_with(path, ".ppm")) { read_ppm(path, info, batch); ++n; }
    else n += read_raw(path, info, batch);
  }
  std::vector<int64_t> declared = session.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
  if (declared.size() != 4) fail(model_path + " does not take [batch, 3, H, W] images");
  if (declared[0] > 0 && declared[0] != n)
    fail(model_path + " was exported for batch size " + std::to_string(declared[0]) + " but " + std::to_string(n) +
         " images were given");

  std::vector<int64_t> shape{n, 3, info.height, info.width};
  Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value images = Ort::Value::CreateTensor<float>(memory, batch.data(), batch.size(), shape.data(), shape.size());
  const char* input_names[] = {"images"};
  const char* output_names[] = {"probs"};
  std::vector<Ort::Value> outputs = session.Run(Ort::RunOptions{nullptr}, input_names, &images, 1, output_names, 1);
  const float* probs = outputs[0].GetTensorData<float>();
  size_t classes = info.classes.size();
  if (outputs[0].GetTensorTypeAndShapeInfo().GetElementCount() != size_t(n) * classes)
    fail(model_path + ": output size does not match its class names");

  top_k = std::min(top_k, classes);
  for (int64_t b = 0; b < n; ++b) {
    const float* p = probs + b * classes;
    std::vector<size_t> order(classes);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return p[x] > p[y]; });
    for (size_t r = 0; r < top_k; ++r)
      std::printf("%lld %zu %.9g %s\n", static_cast<long long>(b), r + 1, p[order[r]], info.classes[order[r]].c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "nearl_client: error: onnxruntime: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nearl_client: error: %s\n", e.what());
  }
  return 2;
}
