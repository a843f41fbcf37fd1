#include "nearl/classifier.hpp"

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <fstream>
#include <numeric>
#include <optional>

#include "sha256.hpp"

namespace nearl {
namespace {

constexpr const char* kPrefix = "nearl.";
constexpr const char* kCpu = "CPUExecutionProvider";
constexpr const char* kCuda = "CUDAExecutionProvider";
// nearl.* values stored as JSON (nearl_rt/core/metadata.py JSON_KEYS), and those every model has.
const char* const kJsonKeys[] = {"class_names", "input_size", "mean", "std", "intensity", "templates", "quantization",
                                 "thresholds"};
const char* const kRequiredKeys[] = {"class_names", "input_size", "mean", "std"};

// One environment per process, alive as long as any session (onnxruntime requires it to outlive them).
Ort::Env& environment() {
  static Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "nearl");
  return env;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

std::string preprocess_path_of(const std::string& model) {  // model.onnx -> model.preprocess.onnx
  std::size_t slash = model.find_last_of('/'), dot = model.find_last_of('.');
  std::string stem = (dot != std::string::npos && (slash == std::string::npos || dot > slash)) ? model.substr(0, dot) : model;
  return stem + ".preprocess.onnx";
}

Ort::Session open_session(const std::string& path, const Ort::SessionOptions& options) {
  if (!file_exists(path)) throw Error("model not found: " + path + " (export one with `python -m export.onnx CKPT`)");
  try {
    return Ort::Session(environment(), path.c_str(), options);
  } catch (const Ort::Exception& e) {
    throw Error("onnxruntime cannot load " + path + ": " + first_line(e.what()));
  }
}

nlohmann::json read_metadata(Ort::Session& session) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::ModelMetadata meta = session.GetModelMetadata();
  nlohmann::json out = nlohmann::json::object();
  for (const Ort::AllocatedStringPtr& key : meta.GetCustomMetadataMapKeysAllocated(alloc)) {
    std::string k = key.get();
    if (k.rfind(kPrefix, 0) != 0) continue;
    std::string name = k.substr(std::string(kPrefix).size());
    std::string value = meta.LookupCustomMetadataMapAllocated(k.c_str(), alloc).get();
    bool is_json = std::find(std::begin(kJsonKeys), std::end(kJsonKeys), name) != std::end(kJsonKeys);
    out[name] = is_json ? nlohmann::json::parse(value, nullptr, false) : nlohmann::json(value);
  }
  return out;
}

bool has_output(Ort::Session& s, const std::string& name) {
  Ort::AllocatorWithDefaultOptions alloc;
  for (std::size_t i = 0; i < s.GetOutputCount(); ++i)
    if (s.GetOutputNameAllocated(i, alloc).get() == name) return true;
  return false;
}

void check_top_k(std::size_t top_k, std::size_t classes) {
  if (top_k > classes)
    throw Error("top_k=" + std::to_string(top_k) + " but the model has " + std::to_string(classes) + " classes");
}

std::string shape_text(int h, int w, int c) {
  return std::to_string(h) + "x" + std::to_string(w) + "x" + std::to_string(c);
}

}  // namespace

struct Classifier::Impl {
  std::string path;
  nlohmann::json metadata;
  std::vector<std::string> class_names;
  int size = 0;
  std::size_t fixed_batch = 0, max_batch = 32;
  std::string provider = kCpu, fallback_reason;
  // Run() is not const in the C++ API but is thread-safe (onnxruntime guarantees concurrent Run calls).
  mutable std::optional<Ort::Session> session, preprocess;
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

  void open_classifier(const Options& options) {
    Ort::SessionOptions cpu_options;
    if (options.intra_op_threads > 0) cpu_options.SetIntraOpNumThreads(options.intra_op_threads);
    if (options.device == Device::CUDA) {
      std::vector<std::string> available = Ort::GetAvailableProviders();
      if (std::find(available.begin(), available.end(), kCuda) == available.end()) {
        fallback_reason = "this onnxruntime build has no CUDAExecutionProvider (use the onnxruntime-gpu library)";
      } else {
        try {
          Ort::SessionOptions cuda_options;
          if (options.intra_op_threads > 0) cuda_options.SetIntraOpNumThreads(options.intra_op_threads);
          const OrtApi& api = Ort::GetApi();
          OrtCUDAProviderOptionsV2* cuda = nullptr;
          Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
          std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> owner(
              cuda, api.ReleaseCUDAProviderOptions);
          std::string id = std::to_string(options.device_id);
          const char* keys[] = {"device_id"};
          const char* values[] = {id.c_str()};
          Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys, values, 1));
          cuda_options.AppendExecutionProvider_CUDA_V2(*cuda);
          session.emplace(environment(), path.c_str(), cuda_options);
          provider = kCuda;
        } catch (const Ort::Exception& e) {
          fallback_reason = std::string("CUDA unavailable: ") + first_line(e.what());
        }
      }
      if (!session && !options.cuda_fallback)
        throw Error("cannot run " + path + " on CUDA: " + fallback_reason + " (or set Options::cuda_fallback)");
    }
    if (!session) session.emplace(open_session(path, cpu_options));
  }

  void check_classifier() {
    std::string fix = " (export it with `python -m export.onnx CKPT`)";
    for (const char* key : kRequiredKeys)
      if (!metadata.contains(key) || metadata[key].is_discarded())
        throw Error(path + " is not a nearl model: no valid nearl." + key + " metadata" + fix);
    const nlohmann::json &names = metadata["class_names"], &hw = metadata["input_size"];
    if (!names.is_array() || names.empty() || !hw.is_array() || hw.size() != 2 || !hw[0].is_number_integer() ||
        hw[0] != hw[1] || metadata["mean"].size() != 3 || metadata["std"].size() != 3)
      throw Error(path + " has malformed nearl.* metadata (class_names, square input_size, 3 mean/std values)" + fix);
    for (const nlohmann::json& n : names) class_names.push_back(n.get<std::string>());
    size = hw[0].get<int>();
    if (session->GetInputCount() != 1 || !has_output(*session, "probs") || !has_output(*session, "logits"))
      throw Error(path + " is not a nearl model: it needs one input `images` and outputs `logits`, `probs`" + fix);
    std::vector<int64_t> shape = session->GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 4 || shape[1] != 3 || shape[2] != size || shape[3] != size)
      throw Error(path + " does not take float32 [batch, 3, " + std::to_string(size) + ", " + std::to_string(size) +
                  "] images" + fix);
    fixed_batch = shape[0] > 0 ? std::size_t(shape[0]) : 0;
  }

  void open_preprocess(const Options& options) {
    std::string pre = options.preprocess_path.empty() ? preprocess_path_of(path) : options.preprocess_path;
    if (options.preprocess_path.empty() && !file_exists(pre)) return;  // optional unless given
    std::string fix = " (write it with `python -m export.preprocess_graph " + path + "`)";
    if (!file_exists(pre)) throw Error("preprocessing graph not found: " + pre + fix);
    // The graph runs on the CPU: its small shape subgraph does anyway, and onnxruntime's CUDA antialias
    // Resize had wrong results before microsoft/onnxruntime#25265 (not verified on a GPU here).
    Ort::SessionOptions pre_options;
    if (options.intra_op_threads > 0) pre_options.SetIntraOpNumThreads(options.intra_op_threads);
    preprocess.emplace(open_session(pre, pre_options));
    nlohmann::json meta = read_metadata(*preprocess);
    if (meta.value("kind", "") != "preprocess")
      throw Error(pre + " is not a nearl preprocessing graph (no nearl.kind = \"preprocess\")" + fix);
    if (meta.value("classifier_sha256", "") != detail::sha256_file(path))
      throw Error(pre + " was written for another classifier (its nearl.classifier_sha256 does not match " + path +
                  ")" + fix);
    for (const char* key : {"input_size", "mean", "std"})
      if (meta[key] != metadata[key])
        throw Error(pre + " has " + key + " " + meta[key].dump() + " but the classifier " + metadata[key].dump() + fix);
  }

  // float32 [n, 3, S, S] (n <= the model's batch) -> outputs appended to `out`.
  void run_chunk(const float* images, std::size_t n, Scores& out) const {
    std::size_t image_floats = std::size_t(3) * size * size, batch = fixed_batch ? fixed_batch : n;
    std::vector<float> padded;
    if (batch != n) {  // a fixed-batch model: zero images after the real ones
      padded.assign(batch * image_floats, 0.f);
      std::copy(images, images + n * image_floats, padded.begin());
      images = padded.data();
    }
    std::vector<int64_t> shape{int64_t(batch), 3, size, size};
    Ort::Value input = Ort::Value::CreateTensor<float>(cpu, const_cast<float*>(images), batch * image_floats,
                                                       shape.data(), shape.size());
    const char* input_names[] = {"images"};
    const char* output_names[] = {"logits", "probs"};
    std::vector<Ort::Value> outputs;
    try {
      outputs = session->Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names, 2);
    } catch (const Ort::Exception& e) {
      throw Error("onnxruntime failed on " + path + ": " + first_line(e.what()));
    }
    std::size_t classes = class_names.size();
    for (int o = 0; o < 2; ++o) {
      if (outputs[o].GetTensorTypeAndShapeInfo().GetElementCount() != batch * classes)
        throw Error(path + ": the output size does not match its " + std::to_string(classes) + " class names");
      const float* p = outputs[o].GetTensorData<float>();
      std::vector<float>& dst = o == 0 ? out.logits : out.probs;
      dst.insert(dst.end(), p, p + n * classes);
    }
    out.batch += n;
  }
};

Classifier::Classifier(const std::string& model_path, const Options& options) : impl_(std::make_unique<Impl>()) {
  if (options.max_batch == 0) throw Error("Options::max_batch must be >= 1");
  if (!file_exists(model_path))
    throw Error("model not found: " + model_path + " (export one with `python -m export.onnx CKPT --preprocess`)");
  impl_->path = model_path;
  impl_->max_batch = options.max_batch;
  impl_->open_classifier(options);
  impl_->metadata = read_metadata(*impl_->session);
  impl_->check_classifier();
  impl_->open_preprocess(options);
}

Classifier::~Classifier() = default;
Classifier::Classifier(Classifier&&) noexcept = default;
Classifier& Classifier::operator=(Classifier&&) noexcept = default;

const std::vector<std::string>& Classifier::class_names() const { return impl_->class_names; }
const nlohmann::json& Classifier::metadata() const { return impl_->metadata; }
int Classifier::input_size() const { return impl_->size; }
std::size_t Classifier::fixed_batch() const { return impl_->fixed_batch; }
const std::string& Classifier::provider() const { return impl_->provider; }
const std::string& Classifier::fallback_reason() const { return impl_->fallback_reason; }
bool Classifier::has_preprocess() const { return impl_->preprocess.has_value(); }
bool Classifier::multi_label() const { return impl_->metadata.value("labels", std::string("single")) == "multi"; }

std::vector<Predictions> Classifier::findings(const Scores& scores) const {
  if (!multi_label()) throw Error(impl_->path + " is a single-label model: use top() (findings() is multi-label)");
  const std::vector<std::string>& names = impl_->class_names;
  const nlohmann::json& stored = impl_->metadata.contains("thresholds") ? impl_->metadata["thresholds"] : nlohmann::json::object();
  std::vector<Predictions> out(scores.batch);
  for (std::size_t b = 0; b < scores.batch; ++b)
    for (std::size_t c = 0; c < scores.classes; ++c) {
      const float p = scores.probs[b * scores.classes + c];
      const double t = stored.contains(names[c]) ? stored[names[c]].get<double>() : 0.5;
      if (p >= t) out[b].push_back({c, names[c], p});
    }
  return out;
}

std::vector<float> Classifier::preprocess(const ImageView& image) const {
  const Impl& m = *impl_;
  if (!m.preprocess)
    throw Error(m.path + " has no preprocessing graph next to it (" + preprocess_path_of(m.path) +
                "): write it with `python -m export.preprocess_graph " + m.path + "`, or pass preprocessed float32 "
                "images to run()");
  if (!image.pixels) throw Error("image has no pixels (null pointer)");
  if (image.height < 1 || image.width < 1)
    throw Error("image is " + shape_text(image.height, image.width, image.channels) + ": height and width must be >= 1");
  if (image.channels != 1 && image.channels != 3)
    throw Error("image has " + std::to_string(image.channels) + " channels (" +
                shape_text(image.height, image.width, image.channels) + "): pass RGB (3) or grayscale (1) uint8 "
                "pixels, without alpha");
  std::vector<int64_t> shape{1, image.height, image.width, image.channels};
  std::size_t count = std::size_t(image.height) * image.width * image.channels;
  Ort::Value input = Ort::Value::CreateTensor<std::uint8_t>(m.cpu, const_cast<std::uint8_t*>(image.pixels), count,
                                                            shape.data(), shape.size());
  const char* input_names[] = {"image"};
  const char* output_names[] = {"images"};
  std::vector<Ort::Value> out;
  try {
    out = m.preprocess->Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names, 1);
  } catch (const Ort::Exception& e) {
    throw Error("the preprocessing graph failed on a " + shape_text(image.height, image.width, image.channels) +
                " image: " + first_line(e.what()));
  }
  const float* p = out[0].GetTensorData<float>();
  return std::vector<float>(p, p + std::size_t(3) * m.size * m.size);
}

Scores Classifier::run(const float* images, std::size_t n) const {
  const Impl& m = *impl_;
  if (!images || n == 0) throw Error("run() needs at least one preprocessed image (float32 [n, 3, S, S])");
  Scores out;
  out.classes = m.class_names.size();
  std::size_t chunk = m.fixed_batch ? m.fixed_batch : m.max_batch, image_floats = std::size_t(3) * m.size * m.size;
  for (std::size_t i = 0; i < n; i += chunk) m.run_chunk(images + i * image_floats, std::min(chunk, n - i), out);
  return out;
}

std::vector<Predictions> Classifier::top(const Scores& scores, std::size_t top_k) const {
  const std::vector<std::string>& names = impl_->class_names;
  check_top_k(top_k, names.size());
  std::size_t k = top_k ? top_k : names.size();
  std::vector<Predictions> out;
  for (std::size_t b = 0; b < scores.batch; ++b) {
    const float* p = scores.probs.data() + b * scores.classes;
    std::vector<std::size_t> order(scores.classes);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return p[x] > p[y]; });
    Predictions row;
    for (std::size_t r = 0; r < k; ++r) row.push_back(Prediction{order[r], names[order[r]], p[order[r]]});
    out.push_back(std::move(row));
  }
  return out;
}

std::vector<Predictions> Classifier::classify(const std::vector<ImageView>& images, std::size_t top_k) const {
  if (images.empty()) throw Error("classify() needs at least one image");
  check_top_k(top_k, class_names().size());  // fail before any work
  std::vector<float> batch;
  for (const ImageView& image : images) {
    std::vector<float> x = preprocess(image);
    batch.insert(batch.end(), x.begin(), x.end());
  }
  return top(run(batch.data(), images.size()), top_k);
}

Predictions Classifier::classify(const ImageView& image, std::size_t top_k) const {
  return classify(std::vector<ImageView>{image}, top_k).front();
}

Predictions Classifier::classify_encoded(const std::uint8_t* data, std::size_t size, std::size_t top_k) const {
  check_top_k(top_k, class_names().size());  // before decoding
  Image image = decode_image(data, size);
  return classify(image.view(), top_k);
}

Predictions Classifier::classify_file(const std::string& path, std::size_t top_k) const {
  return classify_files({path}, top_k).front();
}

std::vector<Predictions> Classifier::classify_files(const std::vector<std::string>& paths, std::size_t top_k) const {
  check_top_k(top_k, class_names().size());  // before decoding
  std::vector<Image> images;
  for (const std::string& p : paths) images.push_back(read_image(p));
  std::vector<ImageView> views;
  for (const Image& im : images) views.push_back(im.view());
  return classify(views, top_k);
}

}  // namespace nearl
