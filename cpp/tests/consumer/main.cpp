// nearl_consumer MODEL.onnx IMAGE...: classify images from 4 threads on one shared Classifier and
// print "<image> <class> <probability>" for the most probable class, in input order.
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <nearl/classifier.hpp>

int main(int argc, char** argv) try {
  if (argc < 3) throw nearl::Error("usage: nearl_consumer MODEL.onnx IMAGE...");
  nearl::Options options;
  options.intra_op_threads = 1;              // several requests in parallel: one core each
  const nearl::Classifier model(argv[1], options);  // + MODEL.preprocess.onnx
  std::vector<nearl::Predictions> results(argc - 2);
  std::vector<std::string> errors(argc - 2);
  std::vector<std::thread> workers;
  for (int t = 0; t < 4; ++t)
    workers.emplace_back([&, t] {
      for (int i = t; i < argc - 2; i += 4) {
        try { results[i] = model.classify_file(argv[i + 2], 1); }
        catch (const nearl::Error& e) { errors[i] = e.what(); }  // a bad request fails alone
      }
    });
  for (std::thread& w : workers) w.join();
  for (std::size_t i = 0; i < results.size(); ++i)
    if (errors[i].empty()) std::printf("%zu %s %.9g\n", i, results[i][0].label.c_str(), results[i][0].probability);
    else std::printf("%zu error %s\n", i, errors[i].c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "nearl_consumer: error: %s\n", e.what());
  return 2;
}
