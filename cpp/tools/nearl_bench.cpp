// nearl_bench MODEL.onnx IMAGE [--batch B]... [--iters N] [--threads T]: median milliseconds per image of
// (a) decode + preprocess (decode_image + the preprocessing graph) of IMAGE, and (b) the classifier on a
// batch of B preprocessed images (run()). One JSON object on stdout; bench/cpp_vs_python.py drives it.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "nearl/classifier.hpp"

namespace {

template <class F>
double median_ms(int iters, F f) {
  std::vector<double> t;
  f();  // warm-up
  for (int i = 0; i < iters; ++i) {
    auto start = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 3) throw nearl::Error("usage: nearl_bench MODEL.onnx IMAGE [--batch B]... [--iters N] [--threads T]");
  std::vector<std::size_t> batches;
  int iters = 10;
  nearl::Options options;
  for (int a = 3; a + 1 < argc; a += 2) {
    std::string flag = argv[a];
    if (flag == "--batch") batches.push_back(std::stoul(argv[a + 1]));
    else if (flag == "--iters") iters = std::stoi(argv[a + 1]);
    else if (flag == "--threads") options.intra_op_threads = std::stoi(argv[a + 1]);
    else throw nearl::Error("unknown option " + flag);
  }
  if (batches.empty()) batches = {1, 8};
  nearl::Classifier model(argv[1], options);
  std::ifstream f(argv[2], std::ios::binary);
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<float> one;
  double decode_ms = median_ms(iters, [&] { one = model.preprocess(nearl::decode_image(bytes).view()); });
  std::string out = "{\"decode_preprocess_ms\": " + std::to_string(decode_ms) + ", \"classify_ms_per_image\": {";
  for (std::size_t i = 0; i < batches.size(); ++i) {
    std::vector<float> batch;
    for (std::size_t b = 0; b < batches[i]; ++b) batch.insert(batch.end(), one.begin(), one.end());
    double ms = median_ms(iters, [&] { model.run(batch.data(), batches[i]); });
    out += (i ? ", \"" : "\"") + std::to_string(batches[i]) + "\": " + std::to_string(ms / batches[i]);
  }
  std::printf("%s}}\n", out.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "nearl_bench: error: %s\n", e.what());
  return 2;
}
