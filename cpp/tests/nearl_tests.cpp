// ctest suite of the nearl library: nearl_tests <decode_parity|classify_parity|threads|bad_inputs>.
// The cases come from tests/test_cpp_library.py (Pillow-decoded pixels, NearlSession probabilities), which
// writes them with a JSON manifest and passes its path in NEARL_TEST_CASES.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "nearl/classifier.hpp"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

std::vector<std::uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read test file " + path);
  return std::vector<std::uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// A raw uint8 image case: {"raw", "height", "width", "channels"}.
nearl::Image raw_image(const nlohmann::json& c) {
  nearl::Image im;
  im.height = c["height"];
  im.width = c["width"];
  im.channels = c["channels"];
  im.pixels = read_bytes(c["raw"]);
  return im;
}

// Probabilities of all classes in class order.
std::vector<float> by_class(const nearl::Predictions& row) {
  std::vector<float> p(row.size());
  for (const nearl::Prediction& x : row) p[x.index] = x.probability;
  return p;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::fabs(double(a[i]) - b[i]));
  return d;
}

void decode_parity(const nlohmann::json& cases) {
  for (const nlohmann::json& c : cases["decode"]) {
    std::string file = c["file"];
    nearl::Image got = nearl::read_image(file);
    nearl::Image again = nearl::decode_image(read_bytes(file));
    std::vector<std::uint8_t> want = read_bytes(c["raw"]);
    check(got.height == c["height"] && got.width == c["width"] && got.channels == c["channels"],
          file + ": decoded as " + std::to_string(got.height) + "x" + std::to_string(got.width) + "x" +
              std::to_string(got.channels));
    std::size_t differ = 0;
    for (std::size_t i = 0; i < std::min(want.size(), got.pixels.size()); ++i) differ += want[i] != got.pixels[i];
    check(got.pixels.size() == want.size() && differ == 0,
          file + ": " + std::to_string(differ) + " bytes differ from Pillow's");
    check(again.pixels == got.pixels, file + ": decode_image(bytes) != read_image(path)");
  }
}

void classify_parity(const nlohmann::json& cases) {
  const double tol = 1e-6;  // the same onnxruntime, graphs and float32 inputs as NearlSession
  std::map<std::string, nearl::Classifier> models;
  for (const char* key : {"model", "fixed_model"}) {
    nearl::Options options;
    options.max_batch = 2;  // several runs per batch on the dynamic model too
    models.emplace(key, nearl::Classifier(cases[key], options));
  }
  check(models.at("fixed_model").fixed_batch() == 2 && models.at("model").fixed_batch() == 0, "fixed_batch()");
  check(models.at("model").has_preprocess() && models.at("model").provider() == "CPUExecutionProvider", "provider");
  check(models.at("model").metadata() == cases["metadata"], "metadata() != NearlSession.metadata: " +
                                                               models.at("model").metadata().dump());
  for (auto& [key, model] : models) {
    std::vector<nearl::Image> images;
    std::vector<std::vector<float>> expected;
    for (const nlohmann::json& c : cases["classify"]) {
      std::string name = c.contains("file") ? std::string(c["file"]) : std::string(c["raw"]);
      std::vector<float> want = c["probs"][key].get<std::vector<float>>();
      nearl::Predictions got;
      if (c.contains("file")) {
        got = model.classify_file(c["file"]);
        std::vector<std::uint8_t> bytes = read_bytes(c["file"]);
        check(max_diff(by_class(model.classify_encoded(bytes.data(), bytes.size())), want) <= tol,
              key + " classify_encoded " + name);
        images.push_back(nearl::read_image(c["file"]));
      } else {
        images.push_back(raw_image(c));
        got = model.classify(images.back().view());
      }
      expected.push_back(want);
      check(max_diff(by_class(got), want) <= tol, key + " " + name + ": max |C++ - NearlSession| = " +
                                                      std::to_string(max_diff(by_class(got), want)));
      for (std::size_t r = 1; r < got.size(); ++r) check(got[r - 1].probability >= got[r].probability, "sorted");
    }
    std::vector<nearl::ImageView> views;
    for (const nearl::Image& im : images) views.push_back(im.view());
    std::vector<nearl::Predictions> batch = model.classify(views, 2);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      check(batch[i].size() == 2 && batch[i][0].probability == *std::max_element(expected[i].begin(), expected[i].end()) &&
                std::fabs(batch[i][0].probability - expected[i][batch[i][0].index]) <= tol,
            key + " batched top-2 of image " + std::to_string(i));
    }
    const nlohmann::json& pre = cases["preprocessed"];
    std::vector<std::uint8_t> raw = read_bytes(pre["file"]);
    std::size_t n = pre["n"];
    nearl::Scores s = model.run(reinterpret_cast<const float*>(raw.data()), n);
    check(s.batch == n && s.classes == model.class_names().size(), key + " run() shape");
    check(max_diff(s.probs, pre["probs"][key].get<std::vector<float>>()) <= tol, key + " run() probs");
    check(max_diff(s.logits, pre["logits"][key].get<std::vector<float>>()) <= 1e-5, key + " run() logits");
  }
}

void threads(const nlohmann::json& cases) {
  nearl::Options options;
  options.intra_op_threads = 1;
  nearl::Classifier model(cases["model"], options);
  std::vector<nearl::Image> images;
  for (const nlohmann::json& c : cases["classify"])
    images.push_back(c.contains("file") ? nearl::read_image(c["file"]) : raw_image(c));
  std::vector<std::vector<float>> sequential;
  for (const nearl::Image& im : images) sequential.push_back(by_class(model.classify(im.view())));
  const int kThreads = 8, kCalls = 20;
  std::vector<int> mismatches(kThreads, 0), errors(kThreads, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        std::size_t k = std::size_t(t * kCalls + i) % images.size();
        try {
          if (by_class(model.classify(images[k].view())) != sequential[k]) ++mismatches[t];
        } catch (const std::exception&) {
          ++errors[t];
        }
      }
    });
  for (std::thread& th : pool) th.join();
  for (int t = 0; t < kThreads; ++t)
    check(mismatches[t] == 0 && errors[t] == 0, "thread " + std::to_string(t) + ": " + std::to_string(mismatches[t]) +
                                                    " results differ from sequential ones, " +
                                                    std::to_string(errors[t]) + " errors");
}

// `f` must throw nearl::Error whose one-line message contains `expect`.
void expect_error(const std::string& name, const std::string& expect, const std::function<void()>& f) {
  try {
    f();
    check(false, name + ": no error");
  } catch (const nearl::Error& e) {
    std::string msg = e.what();
    check(msg.find(expect) != std::string::npos && msg.find('\n') == std::string::npos,
          name + ": message \"" + msg + "\" lacks \"" + expect + "\"");
  }
}

void bad_inputs(const nlohmann::json& cases) {
  const nlohmann::json& bad = cases["bad"];
  expect_error("missing model", "model not found", [&] { nearl::Classifier m(bad["missing"]); });
  expect_error("not an ONNX file", "onnxruntime cannot load", [&] { nearl::Classifier m(bad["not_onnx"]); });
  expect_error("not a nearl model", "is not a nearl model", [&] { nearl::Classifier m(bad["not_nearl"]); });
  expect_error("another classifier's graph", "written for another classifier",
               [&] { nearl::Classifier m(bad["foreign_preprocess"]); });
  nearl::Options given;
  given.preprocess_path = bad["missing"];
  expect_error("missing graph", "preprocessing graph not found", [&] { nearl::Classifier m(cases["model"], given); });
  nearl::Options no_batch;
  no_batch.max_batch = 0;
  expect_error("max_batch 0", "max_batch", [&] { nearl::Classifier m(cases["model"], no_batch); });
  nearl::Options strict_cuda;
  strict_cuda.device = nearl::Device::CUDA;
  nearl::Classifier fallback(cases["model"], strict_cuda);
  if (!cases["cuda_provider"]) {  // a CPU-only onnxruntime: falls back, or throws when told not to
    check(fallback.provider() == "CPUExecutionProvider" && !fallback.fallback_reason().empty(), "CUDA fallback");
    strict_cuda.cuda_fallback = false;
    expect_error("CUDA without fallback", "cannot run", [&] { nearl::Classifier m(cases["model"], strict_cuda); });
  } else {  // onnxruntime-gpu: CUDA, or the CPU with the reason (no usable GPU)
    check((fallback.provider() == "CUDAExecutionProvider") == fallback.fallback_reason().empty(), "CUDA or reason");
  }

  nearl::Classifier model(cases["model"]);
  nearl::Classifier bare(bad["no_preprocess"]);
  std::vector<std::uint8_t> px(7 * 5 * 4, 100);
  expect_error("no preprocessing graph", "has no preprocessing graph", [&] { bare.classify({px.data(), 7, 5, 3}); });
  expect_error("4 channels", "has 4 channels", [&] { model.classify({px.data(), 7, 5, 4}); });
  expect_error("2 channels", "has 2 channels", [&] { model.classify({px.data(), 7, 5, 2}); });
  expect_error("zero width", "must be >= 1", [&] { model.classify({px.data(), 7, 0, 3}); });
  expect_error("null pixels", "no pixels", [&] { model.classify({nullptr, 7, 5, 3}); });
  expect_error("top_k too large", "top_k=9", [&] { model.classify({px.data(), 7, 5, 3}, 9); });
  // checked before any decoding: these inputs would fail otherwise
  expect_error("top_k too large, file", "top_k=9", [&] { model.classify_file(bad["missing"], 9); });
  expect_error("top_k too large, bytes", "top_k=9", [&] { model.classify_encoded(px.data(), 0, 9); });
  expect_error("no images", "at least one image", [&] { model.classify(std::vector<nearl::ImageView>{}); });
  expect_error("empty run", "at least one", [&] { model.run(nullptr, 0); });
  expect_error("missing image", "image not found", [&] { model.classify_file(bad["missing"]); });
  expect_error("empty bytes", "empty buffer", [&] { model.classify_encoded(px.data(), 0); });
  for (const nlohmann::json& u : bad["undecodable"])
    expect_error(u["file"], u["error"], [&] { model.classify_file(u["file"]); });
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, void (*)(const nlohmann::json&)> tests = {
      {"decode_parity", decode_parity}, {"classify_parity", classify_parity}, {"threads", threads}, {"bad_inputs", bad_inputs}};
  const char* manifest = std::getenv("NEARL_TEST_CASES");
  if (argc != 2 || !tests.count(argv[1]) || !manifest) {
    std::fprintf(stderr, "usage: NEARL_TEST_CASES=cases.json nearl_tests decode_parity|classify_parity|threads|bad_inputs "
                         "(python -m pytest tests/test_cpp_library.py writes the cases and runs ctest)\n");
    return 2;
  }
  try {
    std::ifstream f(manifest);
    tests[argv[1]](nlohmann::json::parse(f));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED: unexpected exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s: %s\n", argv[1], failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
