// The smallest complete minidl training program, to copy and grow: a model
// made of nn layers, a training loop with AdamW (bfloat16 mixed precision on
// CUDA), and a checkpoint that a second run resumes from.
//   minimal [STEPS] [CHECKPOINT]    exits 1 unless the loss fell
#include <charconv>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "minidl.h"

using namespace minidl;

// A 2-layer MLP regressing y = tanh(3 x0) x1 from x in [-1, 1]^2.
class Net : public nn::Module {
 public:
  Net() : nn::Module("Net") {
    Generator init(1);  // the seed fixes the initial weights
    fc1 = register_module("fc1", std::make_shared<nn::Linear>(2, 64, true, init, TensorOptions{}, 0.5));
    fc2 = register_module("fc2", std::make_shared<nn::Linear>(64, 1, true, init, TensorOptions{}, 0.1));
  }
  Tensor forward(const Tensor& x) const { return fc2->forward(ops::gelu(fc1->forward(x))); }

  std::shared_ptr<nn::Linear> fc1, fc2;
};

// Trains `steps` steps, first restoring the train state from `resume` when
// it is not empty, then saves it to `save`. Returns {first, last} loss.
std::pair<float, float> run(Device device, int steps, const std::string& resume, const std::string& save) {
  auto model = std::make_shared<Net>();
  model->to(device);
  // On CUDA a bfloat16 copy runs forward and backward; AdamW updates the float32 masters.
  std::unique_ptr<nn::MixedPrecision> mp;
  if (device.is_cuda()) mp = std::make_unique<nn::MixedPrecision>(model, std::make_shared<Net>());
  const Net& compute = mp ? static_cast<const Net&>(mp->compute()) : *model;
  nn::AdamW opt(nn::weight_decay_groups(*model, 0.01), {.lr = 1e-2});
  if (mp) mp->attach(opt);
  Generator data(7);  // the batches' random stream: part of the state, so a resumed run sees new batches

  nn::TrainState state{.model = mp ? nullptr : model.get(), .mixed_precision = mp.get(),
                       .optimizer = &opt, .generators = {{"data", &data}}};
  if (!resume.empty()) nn::load_train_state(resume, state, device);

  float first = 0, last = 0;
  for (int i = 0; i < steps; ++i) {
    Tensor x = ops::rand({256, 2}, {DType::Float32, device}, &data) * 2.0 - 1.0;
    Tensor y = ops::tanh(x.narrow(1, 0, 1) * 3.0) * x.narrow(1, 1, 1);
    Tensor pred = compute.forward(mp ? ops::to(x, DType::BFloat16) : x);
    Tensor loss = ops::mean(ops::pow(ops::to(pred, DType::Float32) - y, 2.0));
    opt.zero_grad();
    loss.backward();
    if (mp) mp->gradients_to_masters();
    nn::clip_grad_norm_(mp ? mp->parameters() : model->parameters(), 1.0);
    opt.step();
    // Reading a loss waits for the device: do it rarely.
    if (i == 0 || i == steps - 1 || (opt.step_count() % 50) == 0) {
      last = loss.item<float>();
      if (i == 0) first = last;
      std::printf("step %4lld  loss %.5f\n", static_cast<long long>(opt.step_count()), last);
    }
  }
  nn::save_train_state(save, state);  // model (masters), AdamW moments and step, the data stream
  return {first, last};
}

constexpr const char* kUsage =
    "usage: minimal [STEPS] [CHECKPOINT]\n"
    "Trains a 2-layer MLP to regress y = tanh(3 x0) x1 with AdamW (bfloat16 mixed\n"
    "precision on CUDA when a device is present, else on the CPU): STEPS/2 steps,\n"
    "saving the train state to CHECKPOINT, then the other steps resumed from it.\n"
    "STEPS defaults to 400 (at least 2: a step on each side of the checkpoint),\n"
    "CHECKPOINT to minimal.ckpt (overwritten). Exits 0 when the loss fell, 1 when it\n"
    "did not, 2 on a bad argument or an error.\n";

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "-h") == 0 || std::strcmp(argv[i], "--help") == 0) {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  if (argc > 3) {
    std::fprintf(stderr, "minimal: too many arguments\n%s", kUsage);
    return 2;
  }
  // atoi would read "--help" or "1e3" as 0 or 1 steps and write a checkpoint anyway.
  int steps = 400;
  if (argc > 1) {
    const std::string_view text = argv[1];
    const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), steps);
    if (err != std::errc() || end != text.data() + text.size() || steps < 2) {
      std::fprintf(stderr, "minimal: STEPS must be a whole number of at least 2, got '%s' (see minimal --help)\n",
                   argv[1]);
      return 2;
    }
  }
  const std::string path = argc > 2 ? argv[2] : "minimal.ckpt";
  const Device device = cuda_is_available() ? Device::cuda() : Device::cpu();
  std::printf("training on %s\n", device.is_cuda() ? "CUDA (bfloat16 mixed precision)" : "the CPU");
  try {
    const float first = run(device, steps / 2, "", path).first;
    std::printf("saved %s; resuming from it\n", path.c_str());
    const float last = run(device, steps - steps / 2, path, path).second;
    std::printf("loss %.5f -> %.5f\n", first, last);
    return last < first ? 0 : 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "minimal: %s\n", e.what());
    return 2;
  }
}
