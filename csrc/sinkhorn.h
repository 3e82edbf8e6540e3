// Batched fixed-iteration entropic Sinkhorn (WKD-L), forward and exact backward.
//
// Row-vector form, per sample b (rows of p, q, u0: (B, C)); K = exp(-cost/eps) and KC = K * cost are
// shared (C, C) matrices; delta = 1e-8:
//
//   for t = 1..T:  a_t = u_{t-1} K + delta;   v_t = q / a_t
//                  b_t = v_t K^T + delta;     u_t = p / b_t
//   w = v_T KC^T (B, C);   cost_b = sum_ij u_T[b,i] KC[i,j] v_T[b,j] = sum_i u_T[b,i] w[b,i]
//
// Reverse mode through the unrolled iterations, g = dL/dcost (B,):
//
//   ubar = g w (w from the forward);  vbar = g (u_T KC)
//   for t = T..1:  pbar += ubar / b_t;   bbar = -ubar u_t / b_t
//                  vbar += bbar K
//                  qbar += vbar / a_t;   abar = -vbar v_t / a_t
//                  ubar  = abar K^T      (skipped at t = 1: u0 is a constant)
//                  vbar  = 0
// Without need_q (the teacher's histogram needs no gradient) qbar is neither accumulated nor allocated, and the
// step at t = 1 stops after pbar (vbar_1 only feeds qbar): one product fewer (two with T = 1: vbar_T too).
//
// Ops (schemas in sinkhorn.cpp, namespace `ckakd`):
//   sinkhorn_fixed_forward(p, q, K, KC, u0, iters)
//       -> (cost (B,), u_hist (T+1,B,C), v_hist, a_hist, b_hist (T,B,C), w (B,C))
//   sinkhorn_fixed_backward(grad_cost, p, q, K, KC, u_hist, v_hist, a_hist, b_hist, w, need_q=True)
//       -> (grad_p, grad_q)   (grad_q has shape (0,) when need_q is false)
//   (w is returned by the forward so that the backward needs one (B x C)(C x C) product fewer.)
//   sinkhorn_converged_forward(p, q, cost, eps, tol, max_iter) -> (value, f, g, info)
//     (sinkhorn_converged.cpp; schema there as a TORCH_LIBRARY_FRAGMENT)
// Fake kernels and autograd formulas: registered from Python when the extension loads (ckakd/ops/sinkhorn_fixed.py,
// ckakd/ops/sinkhorn_converged.py), which also hold the torch twins of these ops (same schemas, `*_torch`).
// Memory: O(T*B*C + C*C); never B*C*C.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace ckakd {

// Added to both Sinkhorn denominators (WKD's public code).
constexpr double kSinkhornDelta = 1e-8;

using SinkhornForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using SinkhornBackwardResult = std::tuple<at::Tensor, at::Tensor>;

// The forward's outputs, allocated uninitialized: cost (B,), u_hist (T+1, B, C), v/a/b_hist (T, B, C), w (B, C).
SinkhornForwardResult empty_forward_outputs(int64_t T, int64_t B, int64_t C, const at::TensorOptions& opts);

// Argument validation shared by the CPU and CUDA kernels (TORCH_CHECK with the offending shapes).
// Return the number of iterations T.
int64_t check_sinkhorn_forward_args(const at::Tensor& p, const at::Tensor& q, const at::Tensor& K,
                                    const at::Tensor& KC, const at::Tensor& u0, int64_t iters);
int64_t check_sinkhorn_backward_args(const at::Tensor& grad_cost, const at::Tensor& p, const at::Tensor& q,
                                     const at::Tensor& K, const at::Tensor& KC, const at::Tensor& u_hist,
                                     const at::Tensor& v_hist, const at::Tensor& a_hist, const at::Tensor& b_hist,
                                     const at::Tensor& w);

SinkhornForwardResult sinkhorn_fixed_forward_cpu(const at::Tensor& p, const at::Tensor& q, const at::Tensor& K,
                                                 const at::Tensor& KC, const at::Tensor& u0, int64_t iters);
SinkhornBackwardResult sinkhorn_fixed_backward_cpu(const at::Tensor& grad_cost, const at::Tensor& p,
                                                   const at::Tensor& q, const at::Tensor& K, const at::Tensor& KC,
                                                   const at::Tensor& u_hist, const at::Tensor& v_hist,
                                                   const at::Tensor& a_hist, const at::Tensor& b_hist,
                                                   const at::Tensor& w, bool need_q);

}  // namespace ckakd
