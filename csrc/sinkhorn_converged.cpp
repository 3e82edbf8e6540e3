// Batched log-domain Sinkhorn run to convergence (the converged mode of ckakd.sinkhorn), with ATen tensor ops
// only: one implementation serves CPU and CUDA tensors (registered under CompositeExplicitAutograd). It is the
// algorithm of `converged_potentials` in ckakd/ops/sinkhorn_converged.py (the op's torch twin), step for step:
//
//   float64 throughout; p, q rescaled to unit mass; log K = -cost/eps, K = exp(log K); f = g = 0
//   for it = 1..max_iter:
//     g = eps (log q - LSE_i(f/eps + log K_ij))      // column half-iteration
//     f = eps (log p - LSE_j(log K_ij + g/eps))      // row half-iteration
//     every 10th iteration (and the last): err = max_b sum_j |P_b 1 - q_b|_j (column marginal, zero-mass
//     columns of q count as 0); stop when err < tol
//   value_b = sum_i exp(f_i/eps + LSE_j(g_j/eps + log C_ij - C_ij/eps))   (log-domain only: log C - C/eps is
//   never formed as log(exp(-C/eps) C), which underflows once C/eps > ~745)
//
// Each LSE is one (B x C)(C x C) matrix product of exp(w - rowmax(w)) with K, with no host sync. At small eps the
// product of a sample loses accuracy when its terms underflow: an output entry (with mass) whose sum S is below
// n max(1, max K) 2^(-1022+53+2) (kLogFastFloor) is flagged, without a sync, as is a product that failed outright
// (non-finite potentials, which stay so until the next check: NaN / inf propagate through the next row maximum).
// The check (one host sync: .item() of the error, NaN when a sample was flagged) restores the flagged samples from
// the previous check's snapshot of (f, g) and iterates them again, and from then on, with the exact log-sum-exp
// over a (rows, C, C) tensor in chunks of at most 2^24 elements; the other samples keep the shifted product. Every
// sample still runs `it` iterations. The final value's LSE recomputes exactly the flagged samples (one more sync).
// The entropic value and all gradients (the envelope one and the implicit one of the transport value) are formed
// from f and g by the ops of ckakd/ops/sinkhorn_converged.py, for both backends; that module also registers this
// op's fake kernel and autograd formula when the extension loads.

// Schema (namespace ckakd, registered here as a fragment of sinkhorn.cpp's library):
//   sinkhorn_converged_forward(Tensor p, Tensor q, Tensor cost, float eps, float tol, int max_iter)
//       -> (Tensor value (B,), Tensor f (B, C), Tensor g (B, C), Tensor info (2,))
// value (the transport cost <P*, C>) and the potentials f, g of the unit-mass problem have p's dtype; info is
// float64 on p's device: [iterations, marginal error].

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace ckakd {
namespace {

constexpr const char* kOp = "ckakd::sinkhorn_converged_forward";
constexpr int64_t kFallbackElements = int64_t{1} << 24;  // per chunk of the exact (rows, C, C) log-sum-exp
constexpr int64_t kCheckEvery = 10;
// log of 2^(-1022+53+2): see LOG_FAST_FLOOR in ckakd/ops/sinkhorn_converged.py
const double kLogFastFloor = (-1022 + 53 + 2) * std::log(2.0);

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

// Samples per chunk of the exact (samples, C, C) log-sum-exp: at most 2^24 elements.
int64_t exact_step(const at::Tensor& lk) {
  return std::max<int64_t>(1, kFallbackElements / std::max<int64_t>(1, lk.numel()));
}

// Rows `rows` (int64 (R,)) of out (B, C) <- the exact log(sum_j exp(w_rj + lk_ij)), as (rows, C, C) tensors in
// chunks of at most 2^24 elements. No host sync.
void exact_logsumexp_rows(at::Tensor& out, const at::Tensor& w, const at::Tensor& lk, const at::Tensor& rows) {
  const int64_t n = rows.numel();
  const int64_t step = exact_step(lk);
  for (int64_t s = 0; s < n; s += step) {
    const at::Tensor r = rows.slice(0, s, std::min(n, s + step));
    out.index_copy_(0, r, at::logsumexp(w.index_select(0, r).unsqueeze(1) + lk.unsqueeze(0), {2}));
  }
}

// 0-dim: the smallest log of a shifted product's sum over the (C, C) kernel k that is accurate. No host sync.
at::Tensor fast_floor(const at::Tensor& k) {
  return at::log(at::amax(k).clamp_min(1.0) * static_cast<double>(k.size(1))) + kLogFastFloor;
}

// log(sum_j exp(w_bj) K_ij) for all b, i; with `transpose`: log(sum_i exp(w_bi) K_ij) for all b, j. One shifted
// product; the samples `exact` (int64 indices) are recomputed exactly. With a defined `floor`, *lossy (B,) bool
// marks the samples with an output entry of mass > 0 whose sum fell below it. Never synchronizes with the host.
at::Tensor logsumexp_kernel(const at::Tensor& w, const at::Tensor& log_k, const at::Tensor& k, bool transpose,
                            const at::Tensor& exact, const at::Tensor& floor = at::Tensor(),
                            const at::Tensor& mass = at::Tensor(), at::Tensor* lossy = nullptr) {
  // lk[i, j]: the log K entry multiplying w_j for output i
  const at::Tensor lk = transpose ? log_k.t() : log_k;
  if (exact.defined() && exact.numel() == w.size(0)) {  // every sample exact: no product at all
    std::vector<at::Tensor> parts;
    for (const at::Tensor& chunk : w.split(exact_step(lk))) {
      parts.push_back(at::logsumexp(chunk.unsqueeze(1) + lk.unsqueeze(0), {2}));
    }
    if (floor.defined()) *lossy = at::zeros({w.size(0)}, w.options().dtype(at::kBool));
    return at::cat(parts);
  }
  const at::Tensor shift = at::amax(w, {1}, /*keepdim=*/true);
  at::Tensor out = at::mm(at::exp(w - shift), transpose ? k : k.t()).log_();
  if (floor.defined()) *lossy = out.lt(floor).logical_and_(mass > 0).any(/*dim=*/1);
  out.add_(shift);
  if (exact.defined() && exact.numel() > 0) exact_logsumexp_rows(out, w, lk, exact);
  return out;
}

// logsumexp_kernel with every sample whose shifted product lost accuracy or is not finite where mass > 0
// recomputed exactly (one sync: nonzero).
at::Tensor logsumexp_checked(const at::Tensor& w, const at::Tensor& log_k, const at::Tensor& k, bool transpose,
                             const at::Tensor& mass) {
  at::Tensor lossy;
  at::Tensor out = logsumexp_kernel(w, log_k, k, transpose, at::Tensor(), fast_floor(k), mass, &lossy);
  const at::Tensor bad = lossy.logical_or_(out.isfinite().logical_not_().logical_and_(mass > 0).any(/*dim=*/1));
  exact_logsumexp_rows(out, w, transpose ? log_k.t() : log_k, bad.nonzero().flatten());
  return out;
}

struct Problem {
  at::Tensor p, q, log_p, log_q, log_k, k, floor;
  double eps;
};

// n iterations from (f, g) (R, C) with the log marginals of those R samples; `exact`: indices (into the R) of
// the samples on the exact log-sum-exp path. With `lossy` (all B samples, no exact ones): *lossy (B,) bool marks
// the samples whose shifted product lost accuracy in any half-iteration.
void iterate(at::Tensor& f, at::Tensor& g, const at::Tensor& log_p, const at::Tensor& log_q, const Problem& pr,
             int64_t n, const at::Tensor& exact, at::Tensor* lossy = nullptr) {
  const at::Tensor none;
  for (int64_t t = 0; t < n; ++t) {
    at::Tensor lost_g, lost_f;
    g = pr.eps * (log_q - logsumexp_kernel(f / pr.eps, pr.log_k, pr.k, /*transpose=*/true, exact,
                                           lossy ? pr.floor : none, pr.q, &lost_g));
    f = pr.eps * (log_p - logsumexp_kernel(g / pr.eps, pr.log_k, pr.k, /*transpose=*/false, exact,
                                           lossy ? pr.floor : none, pr.p, &lost_f));
    if (lossy != nullptr) {
      *lossy = lossy->defined() ? lossy->logical_or_(lost_g).logical_or_(lost_f) : lost_g.logical_or(lost_f);
    }
  }
}

// (B,) bool: a NaN, or an infinite potential where the mass is > 0 (log 0 = -inf is fine).
at::Tensor nonfinite(const at::Tensor& x, const at::Tensor& mass) {
  return x.isnan().logical_or_(x.isinf().logical_and_(mass > 0)).any(/*dim=*/1);
}

// The convergence check: (column marginal L1 error (B,), samples whose fast path failed (B,) bool).
std::tuple<at::Tensor, at::Tensor> check(const at::Tensor& f, const at::Tensor& g, const Problem& pr,
                                         const at::Tensor& exact) {
  at::Tensor lossy;
  const at::Tensor lse =
      logsumexp_kernel(f / pr.eps, pr.log_k, pr.k, /*transpose=*/true, exact, pr.floor, pr.q, &lossy);
  at::Tensor col = at::exp(lse + g / pr.eps);
  col = at::where(pr.q > 0, col, at::zeros_like(col));
  const at::Tensor err = (col - pr.q).abs().sum(1);
  const at::Tensor bad = nonfinite(f, pr.p)
                             .logical_or_(nonfinite(g, pr.q))
                             .logical_or_(lse.isfinite().all(/*dim=*/1).logical_not_())
                             .logical_or_(lossy);
  return {err, bad};
}

ConvergedResult sinkhorn_converged_forward(const at::Tensor& p_, const at::Tensor& q_, const at::Tensor& cost_,
                                           double eps, double tol, int64_t max_iter) {
  check_args(p_, q_, cost_, eps, tol, max_iter);
  const auto out_dtype = p_.scalar_type();
  const int64_t B = p_.size(0), C = p_.size(1);
  at::Tensor p = p_.to(at::kDouble);
  at::Tensor q = q_.to(at::kDouble);
  p = (p / p.sum(1, /*keepdim=*/true)).contiguous();  // unit mass (balanced OT)
  q = (q / q.sum(1, /*keepdim=*/true)).contiguous();
  const at::Tensor c = cost_.to(at::kDouble).contiguous();
  const auto info_opts = p.options();  // float64 on p's device
  if (B == 0) {
    return {at::zeros({0}, p_.options()), at::zeros({0, C}, p_.options()), at::zeros({0, C}, p_.options()),
            at::zeros({2}, info_opts)};
  }
  const at::Tensor log_k = -c / eps;
  const at::Tensor k = at::exp(log_k);
  const Problem pr{p, q, safe_log(p), safe_log(q), log_k, k, fast_floor(k), eps};
  at::Tensor f = at::zeros_like(p);
  at::Tensor g = at::zeros_like(q);
  const auto long_opts = p.options().dtype(at::kLong);
  at::Tensor exact = at::zeros({0}, long_opts);  // samples on the exact path
  at::Tensor is_exact = at::zeros({B}, p.options().dtype(at::kBool));
  at::Tensor snap_f = f, snap_g = g;  // the last check's state (no copy: every iteration makes new tensors)
  int64_t snap_it = 0;
  double err = std::numeric_limits<double>::infinity();
  int64_t it = 0;
  while (it < max_iter) {
    const int64_t n = std::min(kCheckEvery - it % kCheckEvery, max_iter - it);
    at::Tensor lossy;
    iterate(f, g, pr.log_p, pr.log_q, pr, n, exact, &lossy);
    it += n;
    auto [errs, bad] = check(f, g, pr, exact);
    bad.logical_or_(lossy).logical_and_(is_exact.logical_not());
    // the check's one host sync
    double status =
        at::where(bad.any(), std::numeric_limits<double>::quiet_NaN(), errs.max()).item<double>();
    if (std::isnan(status)) {
      const at::Tensor rows = bad.nonzero().flatten();  // each sample fails at most once: exact from then on
      if (rows.numel() > 0) {
        is_exact.index_fill_(0, rows, true);
        exact = at::cat({exact, rows});
        at::Tensor fr = snap_f.index_select(0, rows), gr = snap_g.index_select(0, rows);
        iterate(fr, gr, pr.log_p.index_select(0, rows), pr.log_q.index_select(0, rows), pr, it - snap_it,
                at::arange(rows.numel(), long_opts));
        f = f.index_copy(0, rows, fr);
        g = g.index_copy(0, rows, gr);
        status = std::get<0>(check(f, g, pr, exact)).max().item<double>();
      }
    }
    err = status;
    snap_f = f;
    snap_g = g;
    snap_it = it;
    if (err < tol) break;
  }
  // <P, C> = sum_i exp(f_i/eps + LSE_j(g_j/eps + log C_ij - C_ij/eps)), in the log domain only
  const at::Tensor log_kc = at::where(c > 0, c.log() - c / eps,
                                      at::full({}, -std::numeric_limits<double>::infinity(), c.options()));
  const at::Tensor row = logsumexp_checked(g / eps, log_kc, log_kc.exp(), /*transpose=*/false, p);
  const at::Tensor value = at::exp(f / eps + row).nan_to_num(0.0).sum(1);
  const at::Tensor info = at::tensor({static_cast<double>(it), err}, at::TensorOptions().dtype(at::kDouble));
  return {value.to(out_dtype).contiguous(), f.to(out_dtype).contiguous(), g.to(out_dtype).contiguous(),
          info.to(info_opts.device())};
}

}  // namespace
}  // namespace ckakd

TORCH_LIBRARY_FRAGMENT(ckakd, m) {
  m.def(
      "sinkhorn_converged_forward(Tensor p, Tensor q, Tensor cost, float eps, float tol, int max_iter) -> "
      "(Tensor value, Tensor f, Tensor g, Tensor info)");
}

TORCH_LIBRARY_IMPL(ckakd, CompositeExplicitAutograd, m) {
  m.impl("sinkhorn_converged_forward", &ckakd::sinkhorn_converged_forward);
}
