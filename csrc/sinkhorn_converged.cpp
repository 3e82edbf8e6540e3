// Batched log-domain Sinkhorn run to convergence (the converged mode of ckakd.sinkhorn), with ATen tensor ops
// only: one implementation serves CPU and CUDA tensors (registered under CompositeExplicitAutograd). It is the
// algorithm of `converged_potentials` / `_centered_potential` in ckakd/ops/sinkhorn.py, step for step:
//
//   float64 throughout; log K = -cost/eps, K = exp(log K); f = g = 0
//   for it = 1..max_iter:
//     g = eps (log q - LSE_i(f/eps + log K_ij))      // column half-iteration
//     f = eps (log p - LSE_j(log K_ij + g/eps))      // row half-iteration
//     every 10th iteration (and the last): err = max_b sum_j |P_b 1 - q_b|_j (column marginal, zero-mass
//     columns of q count as 0); stop when err < tol
//   value_b = sum_i exp(f_i/eps + LSE_j(log (K∘C)_ij + g_j/eps))   (every term a plan entry: no overflow)
//   grad_p = f centered over the entries with p > 0 and finite f (others 0); grad_q likewise from g and q
//
// Each LSE is one (B x C)(C x C) matrix product of exp(w - rowmax(w)) with K; rows whose result is not finite
// (the shifted product underflowed to 0, e.g. a zero-mass class far from all others at small eps) are recomputed
// exactly as logsumexp over a (rows, C, C) tensor, in chunks of at most 2^24 elements.
//
// Schema (namespace ckakd, registered here as a fragment of sinkhorn.cpp's library):
//   sinkhorn_converged_forward(Tensor p, Tensor q, Tensor cost, float eps, float tol, int max_iter)
//       -> (Tensor value (B,), Tensor grad_p (B, C), Tensor grad_q (B, C), Tensor info (2,))
// value / grad_p / grad_q have p's dtype; info is float64 on p's device: [iterations, marginal error].

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace ckakd {
namespace {

constexpr const char* kOp = "ckakd::sinkhorn_converged_forward";
constexpr int64_t kFallbackElements = int64_t{1} << 24;  // per chunk of the exact (rows, C, C) log-sum-exp
constexpr int64_t kCheckEvery = 10;

using ConvergedResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_args(const at::Tensor& p, const at::Tensor& q, const at::Tensor& cost, double eps, double tol,
                int64_t max_iter) {
  TORCH_CHECK(p.dim() == 2, kOp, ": p must have shape (B, C); got ", p.sizes());
  TORCH_CHECK(p.size(1) >= 1, kOp, ": the number of classes C must be >= 1; got p of shape ", p.sizes());
  TORCH_CHECK(q.sizes() == p.sizes(), kOp, ": q must have the shape of p ", p.sizes(), "; got ", q.sizes());
  const int64_t C = p.size(1);
  TORCH_CHECK(cost.dim() == 2 && cost.size(0) == C && cost.size(1) == C, kOp, ": cost must have shape (C, C) = (",
              C, ", ", C, "); got ", cost.sizes());
  const auto dtype = p.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, kOp, ": p must be float32 or float64; got ", dtype);
  TORCH_CHECK(q.scalar_type() == dtype, kOp, ": all tensors must have the same dtype; q is ", q.scalar_type(),
              " but p is ", dtype);
  TORCH_CHECK(cost.scalar_type() == dtype, kOp, ": all tensors must have the same dtype; cost is ",
              cost.scalar_type(), " but p is ", dtype);
  TORCH_CHECK(q.device() == p.device(), kOp, ": all tensors must be on the same device; q is on ", q.device(),
              " but p is on ", p.device());
  TORCH_CHECK(cost.device() == p.device(), kOp, ": all tensors must be on the same device; cost is on ",
              cost.device(), " but p is on ", p.device());
  TORCH_CHECK(std::isfinite(eps) && eps > 0, kOp, ": eps must be finite and > 0; got ", eps);
  TORCH_CHECK(tol > 0, kOp, ": tol must be > 0; got ", tol);  // also rejects NaN
  TORCH_CHECK(max_iter >= 1, kOp, ": max_iter must be >= 1; got ", max_iter);
}

// log of a nonnegative tensor with log(0) = -inf exactly (as torch.where(x > 0, x.log(), -inf)).
at::Tensor safe_log(const at::Tensor& x) {
  return at::where(x > 0, x.log(), at::full({}, -std::numeric_limits<double>::infinity(), x.options()));
}

// log(sum_j exp(w_bj) K_ij) for all b, i; with `transpose`: log(sum_i exp(w_bi) K_ij) for all b, j.
at::Tensor logsumexp_kernel(const at::Tensor& w, const at::Tensor& log_k, const at::Tensor& k, bool transpose) {
  const at::Tensor shift = at::amax(w, {1}, /*keepdim=*/true);
  at::Tensor out = at::mm(at::exp(w - shift), transpose ? k : k.t()).log_().add_(shift);
  const at::Tensor bad = out.isfinite().all(/*dim=*/1).logical_not_();
  if (!bad.any().item<bool>()) return out;
  // lk[i, j]: the log K entry multiplying w_j for output i
  const at::Tensor lk = transpose ? log_k.t() : log_k;
  const at::Tensor rows = bad.nonzero().flatten();
  const int64_t n = rows.numel();
  const int64_t step = std::max<int64_t>(1, kFallbackElements / std::max<int64_t>(1, lk.numel()));
  for (int64_t s = 0; s < n; s += step) {
    const at::Tensor r = rows.slice(0, s, std::min(n, s + step));
    out.index_put_({r}, at::logsumexp(w.index_select(0, r).unsqueeze(1) + lk.unsqueeze(0), {2}));
  }
  return out;
}

// Potentials on zero-mass (or non-finite) entries -> 0; the others centered by their mean.
at::Tensor centered_potential(const at::Tensor& f, const at::Tensor& mass) {
  const at::Tensor finite = f.isfinite().logical_and_(mass > 0);
  const at::Tensor zero = at::zeros({}, f.options());
  const at::Tensor count = finite.sum(1, /*keepdim=*/true).clamp_min(1);
  const at::Tensor mean = at::where(finite, f, zero).sum(1, /*keepdim=*/true) / count;
  return at::where(finite, f - mean, zero);
}

ConvergedResult sinkhorn_converged_forward(const at::Tensor& p_, const at::Tensor& q_, const at::Tensor& cost_,
                                           double eps, double tol, int64_t max_iter) {
  check_args(p_, q_, cost_, eps, tol, max_iter);
  const auto out_dtype = p_.scalar_type();
  const int64_t B = p_.size(0), C = p_.size(1);
  const at::Tensor p = p_.to(at::kDouble).contiguous();
  const at::Tensor q = q_.to(at::kDouble).contiguous();
  const at::Tensor c = cost_.to(at::kDouble).contiguous();
  const auto info_opts = p.options();  // float64 on p's device
  if (B == 0) {
    return {at::zeros({0}, p_.options()), at::zeros({0, C}, p_.options()), at::zeros({0, C}, p_.options()),
            at::zeros({2}, info_opts)};
  }
  const at::Tensor log_p = safe_log(p);
  const at::Tensor log_q = safe_log(q);
  const at::Tensor log_k = -c / eps;
  const at::Tensor k = at::exp(log_k);
  const at::Tensor q_pos = q > 0;
  const at::Tensor zero = at::zeros({}, p.options());
  at::Tensor f = at::zeros_like(p);
  at::Tensor g = at::zeros_like(q);
  double err = std::numeric_limits<double>::infinity();
  int64_t it = 0;
  for (it = 1; it <= max_iter; ++it) {
    g = eps * (log_q - logsumexp_kernel(f / eps, log_k, k, /*transpose=*/true));
    f = eps * (log_p - logsumexp_kernel(g / eps, log_k, k, /*transpose=*/false));
    if (it % kCheckEvery == 0 || it == max_iter) {
      at::Tensor col = at::exp(logsumexp_kernel(f / eps, log_k, k, /*transpose=*/true) + g / eps);
      col = at::where(q_pos, col, zero);
      err = (col - q).abs().sum(1).max().item<double>();
      if (err < tol) break;
    }
  }
  it = std::min(it, max_iter);  // the loop ran to completion: it == max_iter + 1
  // <P, C> = sum_i exp(f_i/eps + log sum_j (K∘C)_ij exp(g_j/eps))
  const at::Tensor kc = k * c;
  const at::Tensor row = logsumexp_kernel(g / eps, safe_log(kc), kc, /*transpose=*/false);
  const at::Tensor value = at::exp(f / eps + row).nan_to_num(0.0).sum(1);
  const at::Tensor info = at::tensor({static_cast<double>(it), err}, at::TensorOptions().dtype(at::kDouble));
  return {value.to(out_dtype).contiguous(), centered_potential(f, p).to(out_dtype).contiguous(),
          centered_potential(g, q).to(out_dtype).contiguous(), info.to(info_opts.device())};
}

}  // namespace
}  // namespace ckakd

TORCH_LIBRARY_FRAGMENT(ckakd, m) {
  m.def(
      "sinkhorn_converged_forward(Tensor p, Tensor q, Tensor cost, float eps, float tol, int max_iter) -> "
      "(Tensor value, Tensor grad_p, Tensor grad_q, Tensor info)");
}

TORCH_LIBRARY_IMPL(ckakd, CompositeExplicitAutograd, m) {
  m.impl("sinkhorn_converged_forward", &ckakd::sinkhorn_converged_forward);
}
