// nearl::Classifier: an exported NEARL-CLIP (python -m export.onnx CKPT --preprocess) in onnxruntime.
//
//   nearl::Classifier model("model.onnx");              // + model.preprocess.onnx next to it
//   for (const nearl::Prediction& p : model.classify_file("xray.png", 2))
//     std::cout << p.label << " " << p.probability << "\n";
//
// Images of any size go through the model's preprocessing graph (resize / crop / normalise as training
// did, within one uint8 step of Pillow on a few values), then the classifier in batches.
//
// Thread safety: every const member function (classify*, preprocess, run and the accessors) may be
// called concurrently from any number of threads on one instance; each call keeps its own tensors and
// onnxruntime sessions are shared (Ort::Session::Run is thread-safe). Construction, assignment and
// destruction must not overlap other calls on the same instance.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nearl/error.hpp"
#include "nearl/image.hpp"

namespace nearl {

enum class Device { CPU, CUDA };

struct Options {
  Device device = Device::CPU;
  int device_id = 0;            // CUDA device
  bool cuda_fallback = true;    // CUDA unavailable: run on the CPU (provider() tells) instead of throwing
  int intra_op_threads = 0;     // threads per onnxruntime run; 0 = onnxruntime's default (all cores)
  std::size_t max_batch = 32;   // images per classifier run (dynamic-batch models)
  std::string preprocess_path;  // default: MODEL with .preprocess.onnx, used when that file exists
};

struct Prediction {
  std::size_t index = 0;  // class index in class_names()
  std::string label;
  float probability = 0.f;
};
using Predictions = std::vector<Prediction>;  // most probable first

// Raw outputs for `batch` images: row-major [batch, classes].
struct Scores {
  std::size_t batch = 0, classes = 0;
  std::vector<float> logits, probs;
};

class Classifier {
 public:
  explicit Classifier(const std::string& model_path, const Options& options = {});
  ~Classifier();
  Classifier(Classifier&&) noexcept;
  Classifier& operator=(Classifier&&) noexcept;
  Classifier(const Classifier&) = delete;
  Classifier& operator=(const Classifier&) = delete;

  const std::vector<std::string>& class_names() const;
  // All nearl.* metadata of the classifier, prefix stripped, JSON-encoded values decoded (= NearlSession.metadata).
  const nlohmann::json& metadata() const;
  int input_size() const;             // S: the classifier takes float32 [batch, 3, S, S]
  std::size_t fixed_batch() const;    // 0 = dynamic batch; else inputs are padded to it
  const std::string& provider() const;  // "CUDAExecutionProvider" or "CPUExecutionProvider"
  const std::string& fallback_reason() const;  // why CUDA was not used ("" if it is, or was not asked)
  bool has_preprocess() const;
  // Multi-label (nearl.labels = "multi"): class_names() are findings, probs per finding (sigmoid, independent).
  bool multi_label() const;

  // top_k: how many classes per image, 0 = all. Images need the preprocessing graph.
  Predictions classify(const ImageView& image, std::size_t top_k = 0) const;
  std::vector<Predictions> classify(const std::vector<ImageView>& images, std::size_t top_k = 0) const;
  Predictions classify_encoded(const std::uint8_t* data, std::size_t size, std::size_t top_k = 0) const;
  Predictions classify_file(const std::string& path, std::size_t top_k = 0) const;
  std::vector<Predictions> classify_files(const std::vector<std::string>& paths, std::size_t top_k = 0) const;

  // One image -> the classifier's input, float32 [3, S, S] (the preprocessing graph).
  std::vector<float> preprocess(const ImageView& image) const;
  // Preprocessed float32 [n, 3, S, S] -> logits and probabilities.
  Scores run(const float* images, std::size_t n) const;
  // Scores -> per image the top_k (0 = all) classes, most probable first (ties: lower index first).
  std::vector<Predictions> top(const Scores& scores, std::size_t top_k = 0) const;
  // Multi-label: per image the findings whose probability is >= their stored threshold (nearl.thresholds;
  // 0.5 without one), in class_names() order. Throws for a single-label model.
  std::vector<Predictions> findings(const Scores& scores) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nearl
