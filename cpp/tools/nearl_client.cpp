// nearl_client: classify images with an exported NEARL-CLIP (the nearl::Classifier library).
//
//   nearl_client MODEL.onnx [--top-k K] [--findings] [--device cpu|cuda] [--threads N] INPUT...
//
// --top-k: classes printed per image, 0 = all (default 5, or all when the model has fewer).
// --findings (multi-label models): after an image's ranks, one line "<image>\tfindings\t<f1;f2;...>" naming the
// findings at or above their stored thresholds (0.5 without one; empty when none).
// INPUT: a PNG or JPEG file of any size (decoded, then resized / cropped / normalised by the model's
// preprocessing graph, MODEL.preprocess.onnx), or a raw little-endian float32 file (*.f32) holding
// preprocessed [n, 3, S, S] images. Output: one line per image and rank, tab-separated
// "<image>\t<rank>\t<probability>\t<class name>", where <image> is the file as given (for a .f32 batch:
// "BATCH.f32[i]", i from 0), in input order. Errors: one line on stderr, exit status 2.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "nearl/classifier.hpp"

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::size_t parse_count(const std::string& flag, const std::string& value) {
  std::size_t used = 0;
  unsigned long n = 0;
  try { n = std::stoul(value, &used); } catch (const std::exception&) { used = 0; }
  if (used != value.size() || value.empty() || value[0] == '-')
    throw nearl::Error(flag + " " + value + ": expected a non-negative integer");
  return n;
}

// Raw float32 [n, 3, S, S] -> the floats; throws unless it holds a whole number of images.
std::vector<float> read_raw(const std::string& path, int size) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw nearl::Error("cannot open " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::size_t image_bytes = std::size_t(3) * size * size * sizeof(float);
  if (bytes.empty() || bytes.size() % image_bytes != 0)
    throw nearl::Error(path + " holds " + std::to_string(bytes.size()) + " bytes, not a whole number of float32 [3, " +
                       std::to_string(size) + ", " + std::to_string(size) + "] images");
  std::vector<float> out(bytes.size() / sizeof(float));
  std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(out.data()));
  return out;
}

int run(int argc, char** argv) {
  std::string model_path;
  std::vector<std::string> inputs;
  std::optional<std::size_t> top_k;  // default: 5, or all classes when the model has fewer
  nearl::Options options;
  bool findings = false;
  for (int a = 1; a < argc; ++a) {
    std::string arg = argv[a];
    bool has_value = a + 1 < argc;
    if (arg == "--findings") findings = true;
    else if (arg == "--top-k" && has_value) top_k = parse_count(arg, argv[++a]);
    else if (arg == "--threads" && has_value) options.intra_op_threads = int(parse_count(arg, argv[++a]));
    else if (arg == "--device" && has_value) {
      std::string d = argv[++a];
      if (d != "cpu" && d != "cuda") throw nearl::Error("--device " + d + ": use cpu or cuda");
      options.device = d == "cuda" ? nearl::Device::CUDA : nearl::Device::CPU;
    } else if (model_path.empty()) model_path = arg;
    else inputs.push_back(arg);
  }
  if (model_path.empty() || inputs.empty())
    throw nearl::Error("usage: nearl_client MODEL.onnx [--top-k K] [--findings] [--device cpu|cuda] [--threads N] "
                       "IMAGE.png|IMAGE.jpg|BATCH.f32 ...");
  nearl::Classifier model(model_path, options);
  if (!model.fallback_reason().empty())
    std::fprintf(stderr, "nearl_client: running on the CPU: %s\n", model.fallback_reason().c_str());
  std::size_t classes = model.class_names().size();
  if (top_k && *top_k > classes)  // before any input is read
    throw nearl::Error("--top-k " + std::to_string(*top_k) + ": the model has " + std::to_string(classes) +
                       " classes (0 = all)");
  if (findings && !model.multi_label())
    throw nearl::Error("--findings: " + model_path + " is a single-label model (its classes exclude each other)");
  std::size_t k = top_k ? *top_k : std::min<std::size_t>(5, classes);
  std::string out;  // printed only when every input succeeded
  for (const std::string& path : inputs) {
    bool batch = ends_with(path, ".f32");
    std::vector<float> x = batch ? read_raw(path, model.input_size()) : model.preprocess(nearl::read_image(path).view());
    nearl::Scores scores = model.run(x.data(), x.size() / (std::size_t(3) * model.input_size() * model.input_size()));
    std::vector<nearl::Predictions> rows = model.top(scores, k);
    std::vector<nearl::Predictions> decided = findings ? model.findings(scores) : std::vector<nearl::Predictions>{};
    for (std::size_t i = 0; i < rows.size(); ++i) {
      std::string image = batch ? path + "[" + std::to_string(i) + "]" : path;
      for (std::size_t r = 0; r < rows[i].size(); ++r) {
        char line[48];
        std::snprintf(line, sizeof(line), "\t%zu\t%.9g\t", r + 1, rows[i][r].probability);
        out += image + line + rows[i][r].label + "\n";
      }
      if (findings) {
        out += image + "\tfindings\t";
        for (std::size_t f = 0; f < decided[i].size(); ++f) out += (f ? ";" : "") + decided[i][f].label;
        out += "\n";
      }
    }
  }
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nearl_client: error: %s\n", e.what());
  }
  return 2;
}
