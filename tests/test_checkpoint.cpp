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
  nn::CharTransformerConfig config;
  config.vocab_size = 9;
  config.n_layer = 2;
  config.n_head = 2;
  config.n_embd = 8;
  config.block_size = 8;
  nn::CharTransformer a(config, 1);
  std::string path = dir.file("model.ckpt");
  nn::save_checkpoint(path, a.state_dict(), config.to_metadata());

  nn::Checkpoint ckpt = nn::load_checkpoint(path);
  nn::CharTransformer b(nn::CharTransformerConfig::from_metadata(ckpt.metadata), 2);
  b.load_state_dict(ckpt.tensors);
  Tensor idx = from_vector(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}, {1, 8});
  CHECK(a.forward(idx).to_vector<float>() == b.forward(idx).to_vector<float>());

  // A checkpoint of a different model: load_state_dict names the problems.
  config.n_layer = 1;
  nn::CharTransformer small(config);
  nn::save_checkpoint(path, small.state_dict(), {});
  CHECK_THROWS_WITH_AS(b.load_state_dict(nn::load_checkpoint(path).tensors),
                       doctest::Contains("missing keys (12): h.1.ln_1.weight"), Error);
  config.n_layer = 2;
  config.n_embd = 4;
  nn::CharTransformer narrow(config);
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
