#pragma once
// Basic layers. Initialisation follows nanoGPT: Linear and Embedding weights
// N(0, 0.02) (the std is a parameter, so residual projections can use
// 0.02/sqrt(2 n_layer)), zero biases, LayerNorm weight 1 and bias 0. Random
// numbers come from the Generator given to the constructor; `options` picks
// the parameters' dtype and device (float64 for gradchecks).
#include <cstdint>
#include <memory>

#include "core/generator.h"
#include "nn/module.h"

namespace minidl::nn {

constexpr double kDefaultInitStd = 0.02;

// A tensor of `shape` drawn from N(0, std^2); a fresh leaf, not requiring grad.
Tensor normal_init(const Shape& shape, double std, Generator& gen, TensorOptions options = {});

// y = x W^T + b over the last dim: x (..., in) -> (..., out); W (out, in).
// ops::linear (one GEMM with a fused bias; gradients in the parameters' layout).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias, Generator& gen,
         TensorOptions options = {}, double init_std = kDefaultInitStd);
  Tensor forward(const Tensor& x) const;

  int64_t in_features, out_features;
  Tensor weight;  // (out, in)
  Tensor bias;    // (out), undefined without bias
};

// Rows of weight (V, C) picked by int32 indices of any shape -> (*idx, C).
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t embedding_dim, Generator& gen,
            TensorOptions options = {}, double init_std = kDefaultInitStd);
  Tensor forward(const Tensor& indices) const;

  int64_t num_embeddings, embedding_dim;
  Tensor weight;  // (V, C)
};

// Over the last dim, with a learned scale and (optionally) shift.
class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, bool bias = true, TensorOptions options = {}, double eps = 1e-5);
  Tensor forward(const Tensor& x) const;

  int64_t dim;
  double eps;
  Tensor weight;  // (dim), ones
  Tensor bias;    // (dim), zeros; undefined without bias
};

// Active only in training mode (is_training()); masks come from `gen`
// (default_generator() when null), which must outlive the layer.
class Dropout : public Module {
 public:
  explicit Dropout(double p, Generator* gen = nullptr);
  Tensor forward(const Tensor& x) const;

  double p;
  Generator* gen;
};

// The transformer feed-forward: Linear(C, 4C) -> GELU (tanh) -> Linear(4C, C)
// -> dropout. `proj_init_std` initialises the output projection. The two
// Linears run as one ops::mlp, which fuses the bias and GELU into the GEMMs
// forward and backward.
class MLP : public Module {
 public:
  MLP(int64_t n_embd, bool bias, double dropout, Generator& gen, Generator* dropout_gen = nullptr,
      TensorOptions options = {}, double proj_init_std = kDefaultInitStd);
  Tensor forward(const Tensor& x) const;
  // forward(x) before the dropout `drop`, for a caller that fuses that
  // dropout into its residual add (TransformerBlock).
  Tensor forward_before_dropout(const Tensor& x) const;

  std::shared_ptr<Linear> c_fc, c_proj;
  std::shared_ptr<Dropout> drop;
};

}  // namespace minidl::nn
