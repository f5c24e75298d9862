#include "nn/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "autograd/grad_mode.h"
#include "core/generator.h"
#include "nn/mixed_precision.h"
#include "nn/module.h"
#include "nn/optim.h"
#include "ops/ops.h"

namespace minidl::nn {

static_assert(std::endian::native == std::endian::little,
              "the checkpoint format is little-endian; add byte swapping for this host");

namespace {

constexpr char kMagic[8] = {'M', 'I', 'N', 'I', 'D', 'L', 'C', 'K'};
constexpr size_t kHeaderSize = 32;  // magic, version, reserved, body size, checksum
constexpr size_t kAlignment = 64;   // of the data section and of each tensor in it

// Dtype codes stored in the file: fixed, independent of the DType enum.
uint8_t dtype_code(DType d) {
  switch (d) {
    case DType::Float32: return 0;
    case DType::Float64: return 1;
    case DType::BFloat16: return 2;
    case DType::Int32: return 3;
  }
  MINIDL_FAIL("save_checkpoint: unknown dtype");
}

bool dtype_from_code(uint8_t code, DType* out) {
  static constexpr DType kDtypes[] = {DType::Float32, DType::Float64, DType::BFloat16, DType::Int32};
  if (code >= 4) return false;
  *out = kDtypes[code];
  return true;
}

size_t align_up(size_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

template <typename T> void put(std::vector<unsigned char>& out, T value) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.insert(out.end(), bytes, bytes + sizeof(T));
}

void put_bytes(std::vector<unsigned char>& out, const std::string& s) {
  out.insert(out.end(), s.begin(), s.end());
}

std::string errno_text() { return std::strerror(errno); }

// Writes all of `n` bytes or throws.
void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    MINIDL_CHECK(w > 0, "save_checkpoint: writing '", path, "' failed: ", errno_text());
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// An open file descriptor that closes (and, unless released, removes the
// temporary file) on scope exit, so a failed save leaves nothing behind.
struct TempFile {
  int fd = -1;
  std::string path;
  bool keep = false;
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!keep) ::unlink(path.c_str());
  }
};

std::string hex64(uint64_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

// Printable form of up to 8 bytes for the bad-magic message.
std::string show_bytes(const unsigned char* p, size_t n) {
  std::ostringstream os;
  os << '"';
  for (size_t i = 0; i < n; ++i) {
    if (p[i] >= 32 && p[i] < 127 && p[i] != '"' && p[i] != '\\') os << static_cast<char>(p[i]);
    else os << "\\x" << std::hex << (p[i] >> 4) << (p[i] & 15) << std::dec;
  }
  os << '"';
  return os.str();
}

// Bounds-checked little-endian reader over the body.
class Reader {
 public:
  Reader(const unsigned char* data, size_t size, const std::string& path)
      : data_(data), size_(size), path_(path) {}
  template <typename T> T get(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string get_string(size_t n, const char* what) {
    need(n, what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }
  size_t pos() const { return pos_; }

 private:
  void need(size_t n, const char* what) {
    MINIDL_CHECK(n <= size_ - pos_, "load_checkpoint: '", path_, "' has a malformed table: ", what,
                 " at body offset ", pos_, " needs ", n, " bytes, only ", size_ - pos_, " remain");
  }
  const unsigned char* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

}  // namespace

uint64_t fnv1a64(const void* data, size_t n, uint64_t hash) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    hash ^= p[i];
    hash *= 0x100000001b3ull;
  }
  return hash;
}

void save_checkpoint(const std::string& path, const StateDict& tensors,
                     const std::map<std::string, std::string>& metadata) {
  // Table: metadata, then one entry per tensor with its offset in the data
  // section (each tensor 64-byte aligned).
  std::vector<unsigned char> table;
  put<uint32_t>(table, static_cast<uint32_t>(metadata.size()));
  for (const auto& [key, value] : metadata) {
    put<uint32_t>(table, static_cast<uint32_t>(key.size()));
    put_bytes(table, key);
    put<uint64_t>(table, value.size());
    put_bytes(table, value);
  }
  put<uint32_t>(table, static_cast<uint32_t>(tensors.size()));
  uint64_t data_size = 0;
  for (const auto& [name, t] : tensors) {
    MINIDL_CHECK(t.defined(), "save_checkpoint: tensor '", name, "' is undefined");
    MINIDL_CHECK(t.dim() <= 255, "save_checkpoint: tensor '", name, "' has too many dims");
    put<uint32_t>(table, static_cast<uint32_t>(name.size()));
    put_bytes(table, name);
    put<uint8_t>(table, dtype_code(t.dtype()));
    put<uint8_t>(table, static_cast<uint8_t>(t.dim()));
    put<uint16_t>(table, 0);
    for (int64_t s : t.shape()) put<int64_t>(table, s);
    data_size = align_up(data_size);
    put<uint64_t>(table, data_size);
    put<uint64_t>(table, t.nbytes());
    data_size += t.nbytes();
  }
  // Pad so the data section starts 64-byte aligned in the file.
  table.resize(align_up(kHeaderSize + table.size()) - kHeaderSize, 0);

  TempFile tmp;
  tmp.path = path + ".tmp";
  tmp.fd = ::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MINIDL_CHECK(tmp.fd >= 0, "save_checkpoint: cannot create '", tmp.path, "': ", errno_text());

  unsigned char header[kHeaderSize] = {};
  write_all(tmp.fd, header, kHeaderSize, tmp.path);  // placeholder, rewritten below
  write_all(tmp.fd, table.data(), table.size(), tmp.path);
  uint64_t checksum = fnv1a64(table.data(), table.size());

  NoGradGuard no_grad;
  static const unsigned char zeros[kAlignment] = {};
  uint64_t written = 0;
  for (const auto& [name, t] : tensors) {
    size_t pad = align_up(written) - written;
    write_all(tmp.fd, zeros, pad, tmp.path);
    checksum = fnv1a64(zeros, pad, checksum);
    Tensor host = ops::contiguous(t).to(Device::cpu());
    write_all(tmp.fd, host.raw_data(), host.nbytes(), tmp.path);
    checksum = fnv1a64(host.raw_data(), host.nbytes(), checksum);
    written += pad + host.nbytes();
  }

  uint64_t body_size = table.size() + data_size;
  std::memcpy(header, kMagic, 8);
  uint32_t version = kCheckpointFormatVersion, reserved = 0;
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &reserved, 4);
  std::memcpy(header + 16, &body_size, 8);
  std::memcpy(header + 24, &checksum, 8);
  MINIDL_CHECK(::pwrite(tmp.fd, header, kHeaderSize, 0) == static_cast<ssize_t>(kHeaderSize),
               "save_checkpoint: writing the header of '", tmp.path, "' failed: ", errno_text());
  MINIDL_CHECK(::fsync(tmp.fd) == 0, "save_checkpoint: fsync of '", tmp.path, "' failed: ",
               errno_text());
  MINIDL_CHECK(::close(tmp.fd) == 0, "save_checkpoint: closing '", tmp.path, "' failed: ",
               errno_text());
  tmp.fd = -1;
  MINIDL_CHECK(::rename(tmp.path.c_str(), path.c_str()) == 0, "save_checkpoint: renaming '",
               tmp.path, "' to '", path, "' failed: ", errno_text());
  tmp.keep = true;
  // Make the rename itself durable (best effort: some filesystems refuse).
  std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/') + 1);
  int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    (void)::fsync(dir_fd);
    ::close(dir_fd);
  }
}

Checkpoint load_checkpoint(const std::string& path, Device device) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  MINIDL_CHECK(in.good(), "load_checkpoint: cannot open '", path, "': ", errno_text());
  const size_t size = static_cast<size_t>(in.tellg());
  std::vector<unsigned char> file(size);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(file.data()), static_cast<std::streamsize>(size));
  MINIDL_CHECK(in.good() || size == 0, "load_checkpoint: reading '", path, "' failed");

  const size_t magic_seen = std::min<size_t>(size, 8);
  const bool magic_prefix_ok = size > 0 && std::memcmp(file.data(), kMagic, magic_seen) == 0;  // empty: data() may be null
  MINIDL_CHECK(magic_prefix_ok, "load_checkpoint: '", path,
               "' is not a minidl checkpoint (bad magic: expected \"MINIDLCK\", found ",
               show_bytes(file.data(), magic_seen), ")");
  MINIDL_CHECK(size >= kHeaderSize, "load_checkpoint: '", path, "' is truncated: expected at least ",
               kHeaderSize, " bytes of header, file has ", size, " bytes");

  uint32_t version;
  uint64_t body_size, stored_checksum;
  std::memcpy(&version, file.data() + 8, 4);
  std::memcpy(&body_size, file.data() + 16, 8);
  std::memcpy(&stored_checksum, file.data() + 24, 8);
  MINIDL_CHECK(version == kCheckpointFormatVersion, "load_checkpoint: '", path,
               "' has unsupported format version ", version, " (this build reads version ",
               kCheckpointFormatVersion, ")");
  const uint64_t body_available = size - kHeaderSize;
  MINIDL_CHECK(body_size <= body_available, "load_checkpoint: '", path, "' is truncated: expected ",
               kHeaderSize, " + ", body_size, " = ", kHeaderSize + body_size, " bytes, file has ", size,
               " bytes");
  MINIDL_CHECK(body_size == body_available, "load_checkpoint: '", path, "' has ",
               body_available - body_size, " unexpected bytes after the expected ",
               kHeaderSize + body_size, " bytes");
  const unsigned char* body = file.data() + kHeaderSize;
  const uint64_t checksum = fnv1a64(body, body_size);
  MINIDL_CHECK(checksum == stored_checksum, "load_checkpoint: '", path,
               "' failed its checksum (stored ", hex64(stored_checksum), ", computed ", hex64(checksum),
               "): the file is corrupted");

  Checkpoint ckpt;
  Reader r(body, body_size, path);
  const uint32_t n_meta = r.get<uint32_t>("metadata count");
  for (uint32_t i = 0; i < n_meta; ++i) {
    std::string key = r.get_string(r.get<uint32_t>("metadata key length"), "metadata key");
    std::string value = r.get_string(r.get<uint64_t>("metadata value length"), "metadata value");
    MINIDL_CHECK(ckpt.metadata.emplace(key, std::move(value)).second, "load_checkpoint: '", path,
                 "' has a malformed table: duplicate metadata key '", key, "'");
  }
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t offset, nbytes;
  };
  std::vector<Entry> entries;
  const uint32_t n_tensors = r.get<uint32_t>("tensor count");
  for (uint32_t i = 0; i < n_tensors; ++i) {
    Entry e;
    e.name = r.get_string(r.get<uint32_t>("tensor name length"), "tensor name");
    uint8_t code = r.get<uint8_t>("dtype");
    MINIDL_CHECK(dtype_from_code(code, &e.dtype), "load_checkpoint: '", path,
                 "' has a malformed table: tensor '", e.name, "' has unknown dtype code ", int(code));
    uint8_t ndim = r.get<uint8_t>("ndim");
    (void)r.get<uint16_t>("reserved");
    for (uint8_t d = 0; d < ndim; ++d) {
      int64_t s = r.get<int64_t>("dim");
      MINIDL_CHECK(s >= 0, "load_checkpoint: '", path, "' has a malformed table: tensor '", e.name,
                   "' has negative size ", s);
      e.shape.push_back(s);
    }
    e.offset = r.get<uint64_t>("data offset");
    e.nbytes = r.get<uint64_t>("data size");
    entries.push_back(std::move(e));
  }
  const uint64_t data_start = align_up(kHeaderSize + r.pos()) - kHeaderSize;
  MINIDL_CHECK(data_start <= body_size, "load_checkpoint: '", path,
               "' has a malformed table: the data section would start past the end of the file");
  const uint64_t data_size = body_size - data_start;
  for (const Entry& e : entries) {
    // The file's shape is untrusted: its byte count must fit int64 before it is compared.
    const std::string what = "load_checkpoint: '" + path + "' has a malformed table: tensor '" + e.name + "'";
    const uint64_t expected = static_cast<uint64_t>(checked_nbytes(e.shape, element_size(e.dtype), what.c_str()));
    MINIDL_CHECK(e.nbytes == expected && e.offset <= data_size && e.nbytes <= data_size - e.offset,
                 "load_checkpoint: '", path, "' has a malformed table: tensor '", e.name, "' (",
                 e.dtype, " ", shape_str(e.shape), ", ", expected, " bytes) claims ", e.nbytes,
                 " bytes at data offset ", e.offset, " of a ", data_size, "-byte data section");
    Tensor host = Tensor::empty(e.shape, {e.dtype, Device::cpu(), false});
    if (e.nbytes > 0) std::memcpy(host.raw_data(), body + data_start + e.offset, e.nbytes);
    MINIDL_CHECK(!ckpt.tensors.contains(e.name), "load_checkpoint: '", path,
                 "' has a malformed table: duplicate tensor '", e.name, "'");
    ckpt.tensors.insert(e.name, device.is_cpu() ? host : host.to(device));
  }
  return ckpt;
}

// ---- train state ----

namespace {

constexpr const char* kModelPrefix = "model.";
constexpr const char* kOptimPrefix = "optim.";

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

Module* model_of(const TrainState& state, const char* fn) {
  if (state.mixed_precision == nullptr) return state.model;
  Module* master = &state.mixed_precision->master();
  MINIDL_CHECK(state.model == nullptr || state.model == master, fn,
               ": give either model or mixed_precision (whose masters are the model), not another "
               "module");
  return master;
}

std::string rng_key(const std::string& name, const char* field) {
  return "rng." + name + "." + field;
}

}  // namespace

void save_train_state(const std::string& path, const TrainState& state) {
  const Module* model = model_of(state, "save_train_state");
  StateDict tensors;
  auto add = [&](const std::string& name, const Tensor& t) {
    MINIDL_CHECK(!tensors.contains(name), "save_train_state: tensor '", name, "' is given twice");
    tensors.insert(name, t);
  };
  if (model)
    for (const auto& [name, t] : model->state_dict()) add(kModelPrefix + name, t);
  if (state.optimizer)
    for (const auto& [name, t] : state.optimizer->state_dict()) add(kOptimPrefix + name, t);
  for (const auto& [name, t] : state.tensors) {
    MINIDL_CHECK(!starts_with(name, kModelPrefix) && !starts_with(name, kOptimPrefix),
                 "save_train_state: tensor '", name, "' uses a prefix the library reserves ('",
                 kModelPrefix, "', '", kOptimPrefix, "')");
    add(name, t);
  }
  std::map<std::string, std::string> metadata = state.metadata;
  for (const auto& [name, gen] : state.generators) {
    MINIDL_CHECK(gen != nullptr, "save_train_state: generator '", name, "' is null");
    for (const auto& [field, value] : {std::pair{"seed", gen->seed()}, std::pair{"offset", gen->offset()}})
      MINIDL_CHECK(metadata.emplace(rng_key(name, field), std::to_string(value)).second,
                   "save_train_state: metadata '", rng_key(name, field),
                   "' is given twice (generator names must be unique and not used by the caller's "
                   "metadata)");
  }
  save_checkpoint(path, tensors, metadata);
}

void restore_train_state(const Checkpoint& checkpoint, const TrainState& state) {
  Module* model = model_of(state, "restore_train_state");
  StateDict model_state, optim_state;
  for (const auto& [name, t] : checkpoint.tensors) {
    if (starts_with(name, kModelPrefix)) model_state.insert(name.substr(6), t);
    else if (starts_with(name, kOptimPrefix)) optim_state.insert(name.substr(6), t);
  }

  // Every part is checked before any is restored, so a mismatch changes nothing.
  std::vector<std::string> problems;
  auto check_tensor = [&](const std::string& key, const Tensor* saved, const Tensor& live,
                          bool same_dtype) {
    if (saved == nullptr) problems.push_back("missing tensor '" + key + "'");
    else if (saved->shape() != live.shape() || (same_dtype && saved->dtype() != live.dtype()))
      problems.push_back(::minidl::detail::concat("tensor '", key, "' is ", saved->dtype(), " ",
                                                  shape_str(saved->shape()), ", expected ",
                                                  live.dtype(), " ", shape_str(live.shape())));
  };
  if (model) {
    const StateDict live = model->state_dict();
    for (const auto& [name, t] : live) check_tensor(kModelPrefix + name, model_state.find(name), t, true);
    for (const auto& [name, t] : model_state)
      if (!live.contains(name)) problems.push_back("unexpected tensor '" + (kModelPrefix + name) + "'");
  }
  if (state.optimizer)
    for (const auto& [name, t] : state.optimizer->state_dict())
      check_tensor(kOptimPrefix + name, optim_state.find(name), t, false);
  for (const auto& [name, t] : state.tensors) check_tensor(name, checkpoint.tensors.find(name), t, false);
  std::vector<std::pair<uint64_t, uint64_t>> rng;
  for (const auto& [name, gen] : state.generators) {
    MINIDL_CHECK(gen != nullptr, "restore_train_state: generator '", name, "' is null");
    uint64_t values[2] = {0, 0};
    const char* fields[2] = {"seed", "offset"};
    for (int k = 0; k < 2; ++k) {
      const std::string key = rng_key(name, fields[k]);
      auto it = checkpoint.metadata.find(key);
      size_t used = 0;
      try {
        if (it != checkpoint.metadata.end()) values[k] = std::stoull(it->second, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (it == checkpoint.metadata.end()) problems.push_back("missing metadata '" + key + "'");
      else if (used == 0 || used != it->second.size() || it->second[0] == '-')
        problems.push_back("metadata '" + key + "' is '" + it->second + "', not an unsigned integer");
    }
    rng.emplace_back(values[0], values[1]);
  }
  if (!problems.empty()) {
    std::ostringstream msg;
    msg << "restore_train_state: the checkpoint does not match the train state:";
    for (size_t i = 0; i < problems.size(); ++i) msg << (i ? ", " : " ") << problems[i];
    throw Error(msg.str());
  }

  if (model) model->load_state_dict(model_state);
  if (state.mixed_precision) state.mixed_precision->sync_compute();
  if (state.optimizer) state.optimizer->load_state_dict(optim_state);
  for (size_t i = 0; i < state.generators.size(); ++i)
    state.generators[i].second->set_state(rng[i].first, rng[i].second);
  NoGradGuard no_grad;
  for (const auto& [name, t] : state.tensors) ops::copy_(t, checkpoint.tensors.at(name));
}

Checkpoint load_train_state(const std::string& path, const TrainState& state, Device device) {
  Checkpoint checkpoint = load_checkpoint(path, device);
  try {
    restore_train_state(checkpoint, state);
  } catch (const Error& e) {
    throw Error(::minidl::detail::concat("load_train_state: '", path, "': ", e.what()));
  }
  return checkpoint;
}

}  // namespace minidl::nn
