// Checkpoint files: round trips of every dtype, each corrupt-file error, and
// atomic saves.
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "tests/helpers.h"

using namespace minidl;
using minidl::testing::random_tensor;

namespace {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("minidl_ckpt_" + std::to_string(::getpid()) + "_" +
                                        std::to_string(counter()++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
  static int& counter() {
    static int n = 0;
    return n;
  }
};

std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

nn::StateDict sample_tensors() {
  nn::StateDict d;
  d.insert("f32", random_tensor({3, 4}, {DType::Float32}));
  d.insert("f64", random_tensor({5}, {DType::Float64}));
  d.insert("bf16", random_tensor({2, 3, 2}, {DType::BFloat16}));
  d.insert("i32", from_vector(std::vector<int32_t>{-7, 0, 42, 2147483647}, {2, 2}));
  d.insert("scalar", from_vector(std::vector<double>{3.25}, {}));
  d.insert("empty", ops::zeros({0, 3}));
  // Non-contiguous: saved in logical (row-major) order.
  d.insert("transposed", random_tensor({3, 2}, {DType::Float32}).transpose(0, 1));
  return d;
}

void check_same(const nn::StateDict& got, const nn::StateDict& want) {
  REQUIRE(got.keys() == want.keys());
  for (const auto& [name, t] : want) {
    INFO("tensor ", name);
    const Tensor& g = got.at(name);
    CHECK(g.dtype() == t.dtype());
    CHECK(g.shape() == t.shape());
    CHECK(g.to_vector<double>() == t.to_vector<double>());  // exact, bit for bit
  }
}

std::string saved_file(const TempDir& dir) {
  std::string path = dir.file("model.ckpt");
  nn::save_checkpoint(path, sample_tensors(), {{"step", "100"}});
  return path;
}

}  // namespace

TEST_CASE("fnv1a64 known values") {
  CHECK(nn::fnv1a64("", 0) == 0xcbf29ce484222325ull);
  CHECK(nn::fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);
  CHECK(nn::fnv1a64("foobar", 6) == 0x85944171f73967e8ull);
  // Incremental hashing equals one pass.
  CHECK(nn::fnv1a64("bar", 3, nn::fnv1a64("foo", 3)) == 0x85944171f73967e8ull);
}

TEST_CASE("checkpoint round trip: every dtype, scalars, empty and strided tensors, metadata") {
  TempDir dir;
  std::string path = dir.file("ckpt.bin");
  nn::StateDict tensors = sample_tensors();
  std::map<std::string, std::string> meta = {
      {"config", "n_layer=6\nn_head=6"},
      {"vocab", std::string("\n !abc\0z", 8)},  // binary-safe, embedded NUL
      {"empty", ""}};
  nn::save_checkpoint(path, tensors, meta);
  nn::Checkpoint ckpt = nn::load_checkpoint(path);
  check_same(ckpt.tensors, tensors);
  CHECK(ckpt.metadata == meta);
  for (const auto& [name, t] : ckpt.tensors) CHECK(t.device().is_cpu());

  // The data section and every tensor in it are 64-byte aligned.
  std::vector<unsigned char> bytes = read_bytes(path);
  CHECK(std::memcmp(bytes.data(), "MINIDLCK", 8) == 0);
  uint64_t body_size;
  std::memcpy(&body_size, bytes.data() + 16, 8);
  CHECK(bytes.size() == 32 + body_size);

  // An empty checkpoint is valid too.
  nn::save_checkpoint(path, {}, {});
  nn::Checkpoint none = nn::load_checkpoint(path);
  CHECK(none.tensors.empty());
  CHECK(none.metadata.empty());
}

TEST_CASE("checkpoint of a model restores it through load_state_dict") {
  TempDir dir;
  nn::TransformerLMConfig config;
  config.vocab_size = 9;
  config.n_layer = 2;
  config.n_head = 2;
  config.n_embd = 8;
  config.block_size = 8;
  nn::TransformerLM a(config, 1);
  std::string path = dir.file("model.ckpt");
  nn::save_checkpoint(path, a.state_dict(), config.to_metadata());

  nn::Checkpoint ckpt = nn::load_checkpoint(path);
  nn::TransformerLM b(nn::TransformerLMConfig::from_metadata(ckpt.metadata), 2);
  b.load_state_dict(ckpt.tensors);
  Tensor idx = from_vector(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}, {1, 8});
  CHECK(a.forward(idx).to_vector<float>() == b.forward(idx).to_vector<float>());

  // A checkpoint of a different model: load_state_dict names the problems.
  config.n_layer = 1;
  nn::TransformerLM small(config);
  nn::save_checkpoint(path, small.state_dict(), {});
  CHECK_THROWS_WITH_AS(b.load_state_dict(nn::load_checkpoint(path).tensors),
                       doctest::Contains("missing keys (12): h.1.ln_1.weight"), Error);
  config.n_layer = 2;
  config.n_embd = 4;
  nn::TransformerLM narrow(config);
  nn::save_checkpoint(path, narrow.state_dict(), {});
  CHECK_THROWS_WITH_AS(b.load_state_dict(nn::load_checkpoint(path).tensors),
                       doctest::Contains("'wte.weight': expected float32 [9, 8] on cpu, got float32 [9, 4]"),
                       Error);
}

TEST_CASE("bad magic: not a minidl checkpoint") {
  TempDir dir;
  std::string path = dir.file("notes.txt");
  write_bytes(path, {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd', '\n'});
  CHECK_THROWS_WITH_AS(nn::load_checkpoint(path),
                       doctest::Contains("is not a minidl checkpoint (bad magic: expected \"MINIDLCK\", "
                                         "found \"hello wo\")"),
                       Error);
  write_bytes(path, {});
  CHECK_THROWS_WITH_AS(nn::load_checkpoint(path), doctest::Contains("is not a minidl checkpoint"), Error);
  CHECK_THROWS_WITH_AS(nn::load_checkpoint(dir.file("missing.ckpt")),
                       doctest::Contains("cannot open '"), Error);
}

TEST_CASE("unsupported format version") {
  TempDir dir;
  std::string path = saved_file(dir);
  std::vector<unsigned char> bytes = read_bytes(path);
  bytes[8] = 7;  // version field (little-endian u32 at offset 8)
  write_bytes(path, bytes);
  CHECK_THROWS_WITH_AS(nn::load_checkpoint(path),
                       doctest::Contains("unsupported format version 7 (this build reads version 1)"),
                       Error);
}

TEST_CASE("truncated files name the expected and actual sizes") {
  TempDir dir;
  std::string path = saved_file(dir);
  std::vector<unsigned char> bytes = read_bytes(path);
  const size_t full = bytes.size();
  bytes.resize(full - 10);
  write_bytes(path, bytes);
  std::string expected = "is truncated: expected 32 + " + std::to_string(full - 32) + " = " +
                         std::to_string(full) + " bytes, file has " + std::to_string(full - 10) + " bytes";
  CHECK_THROWS_WITH_AS(nn::load_checkpoint(path), doctest::Contains(expected.c_str()), Error);

  bytes.resize(20);  // inside the header
  write_bytes(path, bytes);
  CHECK_THROWS_WITH_AS(nn::load_checkpoint(path),
                       doctest::Contains("is truncated: expected at least 32 bytes of header, file has 20 bytes"),
                       Error);

  bytes = read_bytes(saved_file(dir));
  bytes.push_back(0);  // trailing garbage is an error too
  write_bytes(path, bytes);
  CHECK_THROWS_WITH_AS(nn::load_checkpoint(path), doctest::Contains("1 unexpected bytes after"), Error);
}

TEST_CASE("a flipped byte fails the checksum") {
  TempDir dir;
  std::string path = saved_file(dir);
  const std::vector<unsigned char> good = read_bytes(path);
  // One in the table (a name), one in the tensor data near the end.
  for (size_t at : {size_t{40}, good.size() - 3}) {
    std::vector<unsigned char> bytes = good;
    bytes[at] ^= 0x10;
    write_bytes(path, bytes);
    CHECK_THROWS_WITH_AS(nn::load_checkpoint(path),
                         doctest::Contains("failed its checksum (stored 0x"), Error);
  }
  write_bytes(path, good);
  CHECK_NOTHROW(nn::load_checkpoint(path));
}

// A checkpoint body written field by field, then given a valid header (size
// and checksum), so that the table's own checks are reached.
struct Body {
  std::vector<unsigned char> bytes;
  template <typename T> Body& put(T v) {
    unsigned char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    bytes.insert(bytes.end(), b, b + sizeof(T));
    return *this;
  }
  Body& str(const std::string& s) {
    bytes.insert(bytes.end(), s.begin(), s.end());
    return *this;
  }
  // One table entry: name, dtype code, dims, data offset and size.
  Body& tensor(const std::string& name, uint8_t code, const std::vector<int64_t>& dims, uint64_t offset,
               uint64_t nbytes) {
    put<uint32_t>(static_cast<uint32_t>(name.size())).str(name).put<uint8_t>(code);
    put<uint8_t>(static_cast<uint8_t>(dims.size())).put<uint16_t>(0);
    for (int64_t d : dims) put<int64_t>(d);
    return put<uint64_t>(offset).put<uint64_t>(nbytes);
  }
  // Pads the table so the data section starts 64-byte aligned in the file.
  Body& align() {
    bytes.resize((32 + bytes.size() + 63) / 64 * 64 - 32, 0);
    return *this;
  }
  void write(const std::string& path) const {
    std::vector<unsigned char> file = {'M', 'I', 'N', 'I', 'D', 'L', 'C', 'K', 1, 0, 0, 0, 0, 0, 0, 0};
    const uint64_t size = bytes.size(), sum = nn::fnv1a64(bytes.data(), bytes.size());
    file.resize(32);
    std::memcpy(file.data() + 16, &size, 8);
    std::memcpy(file.data() + 24, &sum, 8);
    file.insert(file.end(), bytes.begin(), bytes.end());
    write_bytes(path, file);
  }
};

TEST_CASE("a malformed table with a valid checksum is named, never trusted") {
  TempDir dir;
  const std::string path = dir.file("crafted.ckpt");
  auto fails_with = [&](const Body& body, const char* message) {
    body.write(path);
    CHECK_THROWS_WITH_AS(nn::load_checkpoint(path), doctest::Contains(message), Error);
  };
  // The Body writer itself: a well-formed file loads.
  Body good;
  good.put<uint32_t>(1).put<uint32_t>(4).str("step").put<uint64_t>(2).str("42");
  good.put<uint32_t>(1).tensor("w", 3, {2}, 0, 8).align().put<int32_t>(7).put<int32_t>(-1);
  good.write(path);
  nn::Checkpoint c = nn::load_checkpoint(path);
  CHECK(c.metadata.at("step") == "42");
  CHECK(c.tensors.at("w").to_vector<int32_t>() == std::vector<int32_t>{7, -1});

  fails_with(Body().put<uint32_t>(3), "has a malformed table: metadata key length at body offset 4 needs 4 bytes, "
                                      "only 0 remain");
  fails_with(Body().put<uint32_t>(1).put<uint32_t>(1000).str("k"), "metadata key at body offset 8 needs 1000 bytes");
  fails_with(Body().put<uint32_t>(2).put<uint32_t>(1).str("k").put<uint64_t>(0).put<uint32_t>(1).str("k").put<uint64_t>(0),
             "duplicate metadata key 'k'");
  // A value length near 2^64 must not wrap the bounds check.
  fails_with(Body().put<uint32_t>(1).put<uint32_t>(1).str("k").put<uint64_t>(~uint64_t{0}),
             "metadata value at body offset 17 needs");
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(1).tensor("w", 9, {}, 0, 4), "tensor 'w' has unknown dtype code 9");
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(1).tensor("w", 0, {-2}, 0, 0), "tensor 'w' has negative size -2");
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(1).tensor("w", 0, {3}, 0, 8).align().put<uint64_t>(0),
             "tensor 'w' (float32 [3], 12 bytes) claims 8 bytes at data offset 0 of a 8-byte data section");
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(1).tensor("w", 0, {2}, 8, 8).align().put<uint64_t>(0),
             "claims 8 bytes at data offset 8 of a 8-byte data section");
  // Offsets near 2^64 must not wrap the bounds check either.
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(1).tensor("w", 0, {2}, ~uint64_t{0} - 3, 8).align(),
             "claims 8 bytes at data offset 18446744073709551612");
  // Element counts that overflow int64: refused before any arithmetic trusts them.
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(1).tensor("w", 0, {int64_t{1} << 40, int64_t{1} << 40}, 0, 0).align(),
             "tensor 'w': shape [1099511627776, 1099511627776] has more elements than int64 can count");
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(1).tensor("w", 1, {int64_t{1} << 61}, 0, 0).align(),
             "of 8-byte elements needs more bytes than int64 can count");
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(2).tensor("w", 2, {}, 0, 2).tensor("w", 2, {}, 0, 2).align().put<uint16_t>(0),
             "duplicate tensor 'w'");
  fails_with(Body().put<uint32_t>(0).put<uint32_t>(1).tensor("w", 3, {0}, 0, 0),
             "the data section would start past the end of the file");
}

TEST_CASE("atomic save: no .tmp left behind, replaces the old file, failures leave nothing") {
  TempDir dir;
  std::string path = dir.file("run.ckpt");
  nn::StateDict first;
  first.insert("w", from_vector(std::vector<float>{1, 2}, {2}));
  nn::save_checkpoint(path, first, {{"step", "1"}});
  CHECK(fs::exists(path));
  CHECK(!fs::exists(path + ".tmp"));
  nn::StateDict second;
  second.insert("w", from_vector(std::vector<float>{3, 4}, {2}));
  nn::save_checkpoint(path, second, {{"step", "2"}});
  CHECK(!fs::exists(path + ".tmp"));
  nn::Checkpoint ckpt = nn::load_checkpoint(path);
  CHECK(ckpt.metadata.at("step") == "2");
  CHECK(ckpt.tensors.at("w").to_vector<float>() == std::vector<float>{3, 4});
  // Only the checkpoint is in the directory.
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);

  CHECK_THROWS_WITH_AS(nn::save_checkpoint(dir.file("no/such/dir/x.ckpt"), second, {}),
                       doctest::Contains("save_checkpoint: cannot create '"), Error);
  nn::StateDict undefined;
  undefined.insert("u", Tensor());
  CHECK_THROWS_WITH_AS(nn::save_checkpoint(path, undefined, {}),
                       doctest::Contains("tensor 'u' is undefined"), Error);
  CHECK(!fs::exists(path + ".tmp"));
  CHECK(nn::load_checkpoint(path).metadata.at("step") == "2");  // the old file survives
}

TEST_CASE("checkpoint tensors saved from CUDA and loaded to CUDA") {
  MINIDL_REQUIRE_CUDA();
  TempDir dir;
  std::string path = dir.file("cuda.ckpt");
  nn::StateDict host = sample_tensors();
  nn::StateDict on_gpu;
  for (const auto& [name, t] : host) on_gpu.insert(name, t.to(Device::cuda()));
  nn::save_checkpoint(path, on_gpu, {});
  nn::Checkpoint back = nn::load_checkpoint(path, Device::cuda());
  for (const auto& [name, t] : back.tensors) CHECK(t.is_cuda());
  check_same(back.tensors, host);
  // And the CPU load of the same file is identical.
  check_same(nn::load_checkpoint(path).tensors, host);
}

// ---- train state ----

namespace {

nn::TransformerLMConfig run_config() {
  nn::TransformerLMConfig c;
  c.vocab_size = 9;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 8;
  c.block_size = 8;
  c.dropout = 0.1;
  return c;
}

// A mixed-precision training run: masters, bf16 compute model, attached
// AdamW, a batch generator and a running loss sum.
struct Run {
  std::shared_ptr<nn::TransformerLM> master, compute;
  std::unique_ptr<nn::MixedPrecision> mp;
  std::unique_ptr<nn::AdamW> opt;
  Generator batches;
  Tensor loss_sum = ops::zeros({});

  Run(uint64_t seed, Device device) : batches(seed + 100) {
    master = std::make_shared<nn::TransformerLM>(run_config(), seed);
    master->to(device);
    compute = std::make_shared<nn::TransformerLM>(run_config(), seed);
    mp = std::make_unique<nn::MixedPrecision>(master, compute);
    opt = std::make_unique<nn::AdamW>(nn::weight_decay_groups(*master, 0.1), nn::AdamWOptions{.lr = 1e-2});
    mp->attach(*opt);
    loss_sum = loss_sum.to(device);
  }
  nn::TrainState state() {
    return {.mixed_precision = mp.get(),
            .optimizer = opt.get(),
            .generators = {{"train", &batches}, {"dropout", &compute->dropout_generator()}},
            .tensors = [&] {
              nn::StateDict d;
              d.insert("train.loss_sum", loss_sum);
              return d;
            }(),
            .metadata = {{"train.step", std::to_string(opt->step_count())}}};
  }
  void step() {
    Device device = master->parameters()[0].device();
    Tensor x = ops::mul(ops::rand({2, 8}, {DType::Float32}, &batches), 8.99).to(DType::Int32).to(device);
    Tensor logits = ops::to(compute->forward(x), DType::Float32);
    Tensor loss = ops::cross_entropy(logits.reshape({16, 9}), x.reshape({16}));
    opt->zero_grad();
    loss.backward();
    mp->gradients_to_masters();
    nn::clip_grad_norm_(mp->parameters(), 0.5);
    opt->step();
    NoGradGuard no_grad;
    ops::add_(loss_sum, loss.detach());
  }
};

void check_bit_identical(const nn::StateDict& a, const nn::StateDict& b) {
  REQUIRE(a.keys() == b.keys());
  for (const auto& [name, t] : a) {
    INFO("tensor ", name);
    CHECK(t.dtype() == b.at(name).dtype());
    CHECK(t.to_vector<double>() == b.at(name).to_vector<double>());
  }
}

void check_train_state_round_trip(Device device) {
  TempDir dir;
  const std::string path = dir.file("last.ckpt");
  Run a(1, device);
  a.step();
  a.step();
  nn::save_train_state(path, a.state());
  CHECK(!fs::exists(path + ".tmp"));

  Run b(2, device);  // a different initialisation, overwritten by the load
  nn::TrainState into = b.state();
  nn::Checkpoint ckpt = nn::load_train_state(path, into);
  CHECK(ckpt.metadata.at("train.step") == "2");
  check_bit_identical(b.master->state_dict(), a.master->state_dict());
  check_bit_identical(b.compute->state_dict(), a.compute->state_dict());
  check_bit_identical(b.opt->state_dict(), a.opt->state_dict());
  CHECK(b.opt->step_count() == 2);
  CHECK(b.loss_sum.to_vector<float>() == a.loss_sum.to_vector<float>());
  CHECK(b.batches.seed() == a.batches.seed());
  CHECK(b.batches.offset() == a.batches.offset());
  CHECK(b.compute->dropout_generator().offset() == a.compute->dropout_generator().offset());
  // Both continue identically.
  a.step();
  b.step();
  check_bit_identical(b.master->state_dict(), a.master->state_dict());
  check_bit_identical(b.compute->state_dict(), a.compute->state_dict());
  CHECK(b.loss_sum.to_vector<float>() == a.loss_sum.to_vector<float>());
}

}  // namespace

TEST_CASE("train state: save/load round trip is bit-identical and training continues identically (CPU)") {
  check_train_state_round_trip(Device::cpu());
}

TEST_CASE("train state: save/load round trip is bit-identical and training continues identically (CUDA)") {
  MINIDL_REQUIRE_CUDA();
  check_train_state_round_trip(Device::cuda());
}

TEST_CASE("train state: the layout charlm checkpoints have (model./optim. prefixes, rng metadata)") {
  TempDir dir;
  const std::string path = dir.file("old.ckpt");
  Run a(3, Device::cpu());
  a.step();
  // Hand-assembled exactly as examples/charlm/train.cpp wrote it before the library call.
  nn::StateDict tensors;
  for (const auto& [name, t] : a.master->state_dict()) tensors.insert("model." + name, t);
  for (const auto& [name, t] : a.opt->state_dict()) tensors.insert("optim." + name, t);
  tensors.insert("train.loss_sum", a.loss_sum);
  nn::save_checkpoint(path, tensors,
                      {{"charlm.format", "1"},
                       {"rng.train.seed", std::to_string(a.batches.seed())},
                       {"rng.train.offset", std::to_string(a.batches.offset())},
                       {"rng.dropout.seed", std::to_string(a.compute->dropout_generator().seed())},
                       {"rng.dropout.offset", std::to_string(a.compute->dropout_generator().offset())}});
  // save_train_state writes the same file bytes for the same state.
  nn::TrainState state = a.state();
  state.metadata = {{"charlm.format", "1"}};
  nn::save_train_state(dir.file("new.ckpt"), state);
  CHECK(read_bytes(path) == read_bytes(dir.file("new.ckpt")));

  Run b(4, Device::cpu());
  nn::load_train_state(path, b.state());
  check_bit_identical(b.master->state_dict(), a.master->state_dict());
  check_bit_identical(b.opt->state_dict(), a.opt->state_dict());
}

TEST_CASE("train state: mismatches are named and restore nothing; reserved names refused") {
  TempDir dir;
  const std::string path = dir.file("run.ckpt");
  Run a(5, Device::cpu());
  a.step();
  // Without generators and the loss sum: loading them fails, and nothing changes.
  nn::TrainState partial = a.state();
  partial.generators.clear();
  partial.tensors = {};
  nn::save_train_state(path, partial);
  Run b(6, Device::cpu());
  const std::vector<float> before = b.master->parameters()[0].to_vector<float>();
  const std::string expected = "load_train_state: '" + path +
                               "': restore_train_state: the checkpoint does not match the train "
                               "state: missing tensor 'train.loss_sum', missing metadata "
                               "'rng.train.seed', missing metadata 'rng.train.offset'";
  CHECK_THROWS_WITH_AS(nn::load_train_state(path, b.state()), doctest::Contains(expected.c_str()), Error);
  CHECK(b.master->parameters()[0].to_vector<float>() == before);
  CHECK(b.opt->step_count() == 0);

  // A different model: named per tensor.
  nn::TransformerLMConfig other = run_config();
  other.n_embd = 4;
  nn::TransformerLM small(other, 1);
  CHECK_THROWS_WITH_AS(nn::restore_train_state(nn::load_checkpoint(path), {.model = &small}),
                       doctest::Contains("tensor 'model.wte.weight' is float32 [9, 8], expected float32 [9, 4]"),
                       Error);

  nn::TrainState clash = a.state();
  clash.tensors.insert("model.extra", ops::zeros({1}));
  CHECK_THROWS_WITH_AS(nn::save_train_state(path, clash),
                       doctest::Contains("tensor 'model.extra' uses a prefix the library reserves"), Error);
  clash = a.state();
  clash.metadata["rng.train.seed"] = "1";
  CHECK_THROWS_WITH_AS(nn::save_train_state(path, clash),
                       doctest::Contains("metadata 'rng.train.seed' is given twice"), Error);
  CHECK(!fs::exists(path + ".tmp"));
  CHECK_NOTHROW(nn::load_checkpoint(path));  // the earlier file survives
}
