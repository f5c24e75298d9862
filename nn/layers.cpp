#include "nn/layers.h"

#include "autograd/grad_mode.h"
#include "ops/ops.h"

namespace minidl::nn {

Tensor normal_init(const Shape& shape, double std, Generator& gen, TensorOptions options) {
  NoGradGuard no_grad;
  options.requires_grad = false;
  Tensor t = ops::randn(shape, options, &gen);
  ops::mul_(t, std);
  return t;
}

Linear::Linear(int64_t in, int64_t out, bool with_bias, Generator& gen, TensorOptions options,
               double init_std)
    : Module("Linear"), in_features(in), out_features(out) {
  MINIDL_CHECK(in > 0 && out > 0, "Linear: sizes must be positive, got in_features ", in,
               ", out_features ", out);
  weight = register_parameter("weight", normal_init({out, in}, init_std, gen, options));
  if (with_bias) bias = register_parameter("bias", ops::zeros({out}, {options.dtype, options.device}));
}

Tensor Linear::forward(const Tensor& x) const {
  MINIDL_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "Linear: input ", shape_str(x.shape()),
               " does not end in in_features ", in_features, " (weight ", shape_str(weight.shape()),
               ")");
  return ops::linear(x, weight, bias);
}

Embedding::Embedding(int64_t num, int64_t dim, Generator& gen, TensorOptions options, double init_std)
    : Module("Embedding"), num_embeddings(num), embedding_dim(dim) {
  MINIDL_CHECK(num > 0 && dim > 0, "Embedding: sizes must be positive, got num_embeddings ", num,
               ", embedding_dim ", dim);
  weight = register_parameter("weight", normal_init({num, dim}, init_std, gen, options));
}

Tensor Embedding::forward(const Tensor& indices) const { return ops::embedding(weight, indices); }

LayerNorm::LayerNorm(int64_t d, bool with_bias, TensorOptions options, double eps_)
    : Module("LayerNorm"), dim(d), eps(eps_) {
  MINIDL_CHECK(d > 0, "LayerNorm: dim must be positive, got ", d);
  weight = register_parameter("weight", ops::ones({d}, {options.dtype, options.device}));
  if (with_bias) bias = register_parameter("bias", ops::zeros({d}, {options.dtype, options.device}));
}

Tensor LayerNorm::forward(const Tensor& x) const {
  MINIDL_CHECK(x.dim() >= 1 && x.size(-1) == dim, "LayerNorm: input ", shape_str(x.shape()),
               " does not end in dim ", dim);
  return ops::layer_norm(x, weight, bias, eps);
}

Dropout::Dropout(double p_, Generator* gen_) : Module("Dropout"), p(p_), gen(gen_) {
  MINIDL_CHECK(p >= 0 && p < 1, "Dropout: p must be in [0, 1), got ", p);
}

Tensor Dropout::forward(const Tensor& x) const {
  if (!is_training() || p == 0) return x;
  return ops::dropout(x, p, true, gen);
}

MLP::MLP(int64_t n_embd, bool bias, double dropout, Generator& gen, Generator* dropout_gen,
         TensorOptions options, double proj_init_std)
    : Module("MLP") {
  c_fc = register_module("c_fc", std::make_shared<Linear>(n_embd, 4 * n_embd, bias, gen, options));
  c_proj = register_module(
      "c_proj", std::make_shared<Linear>(4 * n_embd, n_embd, bias, gen, options, proj_init_std));
  drop = register_module("drop", std::make_shared<Dropout>(dropout, dropout_gen));
}

Tensor MLP::forward(const Tensor& x) const { return drop->forward(forward_before_dropout(x)); }

Tensor MLP::forward_before_dropout(const Tensor& x) const {
  MINIDL_CHECK(x.dim() >= 1 && x.size(-1) == c_fc->in_features, "MLP: input ",
               shape_str(x.shape()), " does not end in n_embd ", c_fc->in_features);
  return ops::mlp(x, c_fc->weight, c_fc->bias, c_proj->weight, c_proj->bias);
}

}  // namespace minidl::nn
