// ckakd._C: op schemas, argument checks and the CPU implementation of the batched fixed-iteration Sinkhorn
// (math in sinkhorn.h). The CUDA implementation registers itself in sinkhorn_cuda.cu.
//
// CPU layout: each half-iteration is one (B x C)(C x C) product through at::mm_out (MKL / BLAS, written
// straight into the history buffer), followed by one fused, OpenMP-parallel elementwise pass
// (`a += delta; v = q / a`); the final w = v_T KC^T is returned for the backward. The backward mirrors it:
// two GEMMs per iteration (at::mm_out / addmm_) and two fused passes, plus vbar = u_T KC (ubar = g w reuses the
// forward's w). Temporaries: three (B, C) buffers in the backward.

#include "sinkhorn.h"

#include <tuple>

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>

namespace ckakd {
namespace {

// Elements per parallel_for chunk: big enough that OpenMP overhead is negligible.
constexpr int64_t kGrain = 16384;

void check_float_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64; got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": all tensors must have the same dtype; ", name, " is ",
              t.scalar_type(), " but p is ", dtype);
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& p) {
  TORCH_CHECK(t.device() == p.device(), op, ": all tensors must be on the same device; ", name, " is on ",
              t.device(), " but p is on ", p.device());
}

void check_square(const char* op, const char* name, const at::Tensor& t, int64_t C) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == C && t.size(1) == C, op, ": ", name, " must have shape (C, C) = (",
              C, ", ", C, "); got ", t.sizes());
}

// ---- fused elementwise passes (contiguous ranges, written so -O3 vectorizes them) ----

// a <- a + delta;  out <- num / a
template <typename T>
void add_delta_divide(T* __restrict__ a, const T* __restrict__ num, T* __restrict__ out, int64_t n) {
  const T delta = static_cast<T>(kSinkhornDelta);
  for (int64_t i = 0; i < n; ++i) {
    const T x = a[i] + delta;
    a[i] = x;
    out[i] = num[i] / x;
  }
}

// r = bar / den;  grad (=|+=) r (grad null: that gradient is not needed);  tmp = -r * val
template <typename T>
void backward_step(const T* __restrict__ bar, const T* __restrict__ den, const T* __restrict__ val,
                   T* __restrict__ grad, T* __restrict__ tmp, int64_t n, bool first) {
  if (grad == nullptr) {
    for (int64_t i = 0; i < n; ++i) tmp[i] = -(bar[i] / den[i]) * val[i];
  } else if (first) {
    for (int64_t i = 0; i < n; ++i) {
      const T r = bar[i] / den[i];
      grad[i] = r;
      tmp[i] = -r * val[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T r = bar[i] / den[i];
      grad[i] += r;
      tmp[i] = -r * val[i];
    }
  }
}

template <typename T>
void add_delta_divide_parallel(T* a, const T* num, T* out, int64_t n) {
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    add_delta_divide(a + begin, num + begin, out + begin, end - begin);
  });
}

template <typename T>
void backward_step_parallel(const T* bar, const T* den, const T* val, T* grad, T* tmp, int64_t n, bool first) {
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    backward_step(bar + begin, den + begin, val + begin, grad == nullptr ? nullptr : grad + begin, tmp + begin,
                  end - begin, first);
  });
}

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// argument checks (shared with the CUDA implementation)

int64_t check_sinkhorn_forward_args(const at::Tensor& p, const at::Tensor& q, const at::Tensor& K,
                                    const at::Tensor& KC, const at::Tensor& u0, int64_t iters) {
  constexpr const char* op = "ckakd::sinkhorn_fixed_forward";
  TORCH_CHECK(iters >= 1, op, ": iters must be >= 1; got ", iters);
  TORCH_CHECK(p.dim() == 2, op, ": p must have shape (B, C); got ", p.sizes());
  TORCH_CHECK(p.size(1) >= 1, op, ": the number of classes C must be >= 1; got p of shape ", p.sizes());
  TORCH_CHECK(q.sizes() == p.sizes(), op, ": q must have the shape of p ", p.sizes(), "; got ", q.sizes());
  TORCH_CHECK(u0.sizes() == p.sizes(), op, ": u0 must have the shape of p ", p.sizes(), "; got ", u0.sizes());
  const int64_t C = p.size(1);
  check_square(op, "K", K, C);
  check_square(op, "KC", KC, C);
  const auto dtype = p.scalar_type();
  check_float_dtype(op, "p", p, dtype);
  check_float_dtype(op, "q", q, dtype);
  check_float_dtype(op, "K", K, dtype);
  check_float_dtype(op, "KC", KC, dtype);
  check_float_dtype(op, "u0", u0, dtype);
  check_device(op, "q", q, p);
  check_device(op, "K", K, p);
  check_device(op, "KC", KC, p);
  check_device(op, "u0", u0, p);
  return iters;
}

int64_t check_sinkhorn_backward_args(const at::Tensor& grad_cost, const at::Tensor& p, const at::Tensor& q,
                                     const at::Tensor& K, const at::Tensor& KC, const at::Tensor& u_hist,
                                     const at::Tensor& v_hist, const at::Tensor& a_hist, const at::Tensor& b_hist,
                                     const at::Tensor& w) {
  constexpr const char* op = "ckakd::sinkhorn_fixed_backward";
  TORCH_CHECK(p.dim() == 2, op, ": p must have shape (B, C); got ", p.sizes());
  TORCH_CHECK(p.size(1) >= 1, op, ": the number of classes C must be >= 1; got p of shape ", p.sizes());
  TORCH_CHECK(q.sizes() == p.sizes(), op, ": q must have the shape of p ", p.sizes(), "; got ", q.sizes());
  const int64_t B = p.size(0);
  const int64_t C = p.size(1);
  TORCH_CHECK(grad_cost.dim() == 1 && grad_cost.size(0) == B, op, ": grad_cost must have shape (B,) = (", B,
              ",); got ", grad_cost.sizes());
  check_square(op, "K", K, C);
  check_square(op, "KC", KC, C);
  TORCH_CHECK(v_hist.dim() == 3 && v_hist.size(0) >= 1 && v_hist.size(1) == B && v_hist.size(2) == C, op,
              ": v_hist must have shape (T, B, C) with T >= 1 and (B, C) = ", p.sizes(), "; got ", v_hist.sizes());
  const int64_t T = v_hist.size(0);
  TORCH_CHECK(u_hist.dim() == 3 && u_hist.size(0) == T + 1 && u_hist.size(1) == B && u_hist.size(2) == C, op,
              ": u_hist must have shape (T + 1, B, C) = (", T + 1, ", ", B, ", ", C, "); got ", u_hist.sizes());
  TORCH_CHECK(a_hist.sizes() == v_hist.sizes(), op, ": a_hist must have the shape of v_hist ", v_hist.sizes(),
              "; got ", a_hist.sizes());
  TORCH_CHECK(b_hist.sizes() == v_hist.sizes(), op, ": b_hist must have the shape of v_hist ", v_hist.sizes(),
              "; got ", b_hist.sizes());
  TORCH_CHECK(w.sizes() == p.sizes(), op, ": w must have the shape of p ", p.sizes(), "; got ", w.sizes());
  const auto dtype = p.scalar_type();
  const at::Tensor* tensors[] = {&grad_cost, &p, &q, &K, &KC, &u_hist, &v_hist, &a_hist, &b_hist, &w};
  const char* names[] = {"grad_cost", "p", "q", "K", "KC", "u_hist", "v_hist", "a_hist", "b_hist", "w"};
  for (int i = 0; i < 10; ++i) {
    check_float_dtype(op, names[i], *tensors[i], dtype);
    check_device(op, names[i], *tensors[i], p);
  }
  return T;
}

// ---------------------------------------------------------------------------------------------------------
SinkhornForwardResult empty_forward_outputs(int64_t T, int64_t B, int64_t C, const at::TensorOptions& opts) {
  return {at::empty({B}, opts),         at::empty({T + 1, B, C}, opts), at::empty({T, B, C}, opts),
          at::empty({T, B, C}, opts),   at::empty({T, B, C}, opts),     at::empty({B, C}, opts)};
}

// CPU forward / backward

SinkhornForwardResult sinkhorn_fixed_forward_cpu(const at::Tensor& p_, const at::Tensor& q_, const at::Tensor& K_,
                                                 const at::Tensor& KC_, const at::Tensor& u0_, int64_t iters) {
  const int64_t T = check_sinkhorn_forward_args(p_, q_, K_, KC_, u0_, iters);
  TORCH_CHECK(p_.device().is_cpu(), "ckakd::sinkhorn_fixed_forward (CPU kernel): got tensors on ", p_.device());
  const at::Tensor p = p_.contiguous(), q = q_.contiguous(), K = K_.contiguous(), KC = KC_.contiguous();
  const int64_t B = p.size(0), C = p.size(1), n = B * C;
  const auto opts = p.options();
  at::Tensor cost, u_hist, v_hist, a_hist, b_hist, w;
  std::tie(cost, u_hist, v_hist, a_hist, b_hist, w) = empty_forward_outputs(T, B, C, opts);
  u_hist.select(0, 0).copy_(u0_);
  if (n == 0) {
    cost.zero_();
    return {cost, u_hist, v_hist, a_hist, b_hist, w};
  }
  const at::Tensor Kt = K.t();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "sinkhorn_fixed_forward_cpu", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor u_prev = u_hist.select(0, t), u_next = u_hist.select(0, t + 1);
      at::Tensor a = a_hist.select(0, t), v = v_hist.select(0, t), b = b_hist.select(0, t);
      if (t == 0 && u0_.stride(0) == 0 && B > 1) {
        // u_0 broadcast over the batch (the uniform start): one row product instead of a (B x C)(C x C) GEMM
        at::Tensor a_row = a.narrow(0, 0, 1);
        at::mm_out(a_row, u0_.narrow(0, 0, 1).contiguous(), K);
        a.narrow(0, 1, B - 1).copy_(a_row.expand({B - 1, C}));
      } else {
        at::mm_out(a, u_prev, K);  // a_t = u_{t-1} K
      }
      add_delta_divide_parallel(a.data_ptr<scalar_t>(), qp, v.data_ptr<scalar_t>(), n);
      at::mm_out(b, v, Kt);  // b_t = v_t K^T
      add_delta_divide_parallel(b.data_ptr<scalar_t>(), pp, u_next.data_ptr<scalar_t>(), n);
    }
    // w = v_T KC^T (returned: the backward's ubar = g w);  cost_b = sum_i u_T[b,i] w[b,i]
    at::mm_out(w, v_hist.select(0, T - 1), KC.t());
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* up = u_hist.select(0, T).data_ptr<scalar_t>();
    scalar_t* cp = cost.data_ptr<scalar_t>();
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    at::parallel_for(0, B, row_grain(C), [=](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        acc_t s = 0;
        for (int64_t i = 0; i < C; ++i) s += static_cast<acc_t>(up[r * C + i]) * static_cast<acc_t>(wp[r * C + i]);
        cp[r] = static_cast<scalar_t>(s);
      }
    });
  });
  return {cost, u_hist, v_hist, a_hist, b_hist, w};
}

SinkhornBackwardResult sinkhorn_fixed_backward_cpu(const at::Tensor& grad_cost_, const at::Tensor& p_,
                                                   const at::Tensor& q_, const at::Tensor& K_, const at::Tensor& KC_,
                                                   const at::Tensor& u_hist_, const at::Tensor& v_hist_,
                                                   const at::Tensor& a_hist_, const at::Tensor& b_hist_,
                                                   const at::Tensor& w_, bool need_q) {
  const int64_t T =
      check_sinkhorn_backward_args(grad_cost_, p_, q_, K_, KC_, u_hist_, v_hist_, a_hist_, b_hist_, w_);
  TORCH_CHECK(p_.device().is_cpu(), "ckakd::sinkhorn_fixed_backward (CPU kernel): got tensors on ", p_.device());
  const at::Tensor g = grad_cost_.contiguous(), K = K_.contiguous(), KC = KC_.contiguous();
  const at::Tensor u_hist = u_hist_.contiguous(), v_hist = v_hist_.contiguous();
  const at::Tensor a_hist = a_hist_.contiguous(), b_hist = b_hist_.contiguous(), w = w_.contiguous();
  const int64_t B = p_.size(0), C = p_.size(1), n = B * C;
  const auto opts = p_.options();
  at::Tensor grad_p = at::empty({B, C}, opts);
  at::Tensor grad_q = need_q ? at::empty({B, C}, opts) : at::empty({0}, opts);  // the schema's (0,) without need_q
  if (n == 0) return {grad_p, grad_q};
  const at::Tensor Kt = K.t();
  AT_DISPATCH_FLOATING_TYPES(p_.scalar_type(), "sinkhorn_fixed_backward_cpu", [&] {
    // d cost / d u_T = w = v_T KC^T (from the forward),  d cost / d v_T = u_T KC, scaled per row by g
    at::Tensor ubar = at::empty({B, C}, opts);
    // (without need_q and with T = 1, vbar only feeds grad_q: skip its product)
    at::Tensor vbar = (need_q || T > 1) ? at::mm(u_hist.select(0, T), KC) : at::Tensor();
    at::Tensor tmp = at::empty({B, C}, opts);
    {
      scalar_t* ub = ubar.data_ptr<scalar_t>();
      scalar_t* vb = vbar.defined() ? vbar.data_ptr<scalar_t>() : nullptr;
      const scalar_t* wp = w.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(C), [=](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t s = gp[r];
          for (int64_t i = 0; i < C; ++i) {
            ub[r * C + i] = s * wp[r * C + i];
            if (vb != nullptr) vb[r * C + i] *= s;
          }
        }
      });
    }
    scalar_t* gpp = grad_p.data_ptr<scalar_t>();
    scalar_t* gqp = need_q ? grad_q.data_ptr<scalar_t>() : nullptr;  // null: grad_q is not accumulated
    scalar_t* tp = tmp.data_ptr<scalar_t>();
    for (int64_t t = T; t >= 1; --t) {
      const int64_t k = t - 1;  // index of a_t, b_t, v_t in the (T, B, C) histories
      // u_t = p / b_t:  grad_p += ubar / b_t;  bbar = -ubar u_t / b_t  (into tmp)
      backward_step_parallel(ubar.data_ptr<scalar_t>(), b_hist.select(0, k).data_ptr<scalar_t>(),
                             u_hist.select(0, t).data_ptr<scalar_t>(), gpp, tp, n, t == T);
      if (t == 1 && !need_q) break;  // vbar_1 and abar_1 only feed grad_q
      // b_t = v_t K^T + delta:  vbar (+)= bbar K  (vbar carries d cost / d v_T only at t = T)
      if (t == T) {
        vbar.addmm_(tmp, K);
      } else {
        at::mm_out(vbar, tmp, K);
      }
      // v_t = q / a_t:  grad_q += vbar / a_t (only with need_q);  abar = -vbar v_t / a_t  (into tmp)
      backward_step_parallel(vbar.data_ptr<scalar_t>(), a_hist.select(0, k).data_ptr<scalar_t>(),
                             v_hist.select(0, k).data_ptr<scalar_t>(), gqp, tp, n, t == T);
      // a_t = u_{t-1} K + delta:  ubar = abar K^T  (u_0 is a constant)
      if (t > 1) at::mm_out(ubar, tmp, Kt);
    }
  });
  return {grad_p, grad_q};
}

}  // namespace ckakd

// ---------------------------------------------------------------------------------------------------------
// registration

TORCH_LIBRARY(ckakd, m) {
  m.def(
      "sinkhorn_fixed_forward(Tensor p, Tensor q, Tensor K, Tensor KC, Tensor u0, int iters) -> "
      "(Tensor cost, Tensor u_hist, Tensor v_hist, Tensor a_hist, Tensor b_hist, Tensor w)");
  m.def(
      "sinkhorn_fixed_backward(Tensor grad_cost, Tensor p, Tensor q, Tensor K, Tensor KC, Tensor u_hist, "
      "Tensor v_hist, Tensor a_hist, Tensor b_hist, Tensor w, bool need_q=True) -> (Tensor grad_p, Tensor grad_q)");
}

TORCH_LIBRARY_IMPL(ckakd, CPU, m) {
  m.impl("sinkhorn_fixed_forward", &ckakd::sinkhorn_fixed_forward_cpu);
  m.impl("sinkhorn_fixed_backward", &ckakd::sinkhorn_fixed_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ckakd C++/CUDA extension: batched fixed-iteration Sinkhorn ops, registered as torch.ops.ckakd.*";
  m.def(
      "has_cuda",
      []() {
#ifdef WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True iff this build of the extension contains the CUDA kernels.");
}
