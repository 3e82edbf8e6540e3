// CUDA implementation of ckakd::sinkhorn_fixed_forward / ckakd::sinkhorn_fixed_backward (math in sinkhorn.h).
//
// Two paths, chosen per call:
//  * fused (C <= 128, e.g. CIFAR's C = 100): the whole forward (all T iterations and the final cost) is ONE
//    kernel launch, one block per sample, K staged in shared memory (row stride padded to an odd number of
//    elements so both the row and the column dot products are free of bank conflicts); KC is loaded into the
//    same buffer at the end, and each sample writes its row of w = v_T KC^T. The backward is likewise one launch
//    (it reads w instead of recomputing it; without need_q it neither accumulates nor writes grad_q). Needs C * (C|1) * sizeof(T) bytes of shared
//    memory (64 KB fp32 / 132 KB fp64 at C = 128, 40 KB fp32 at C = 100); when the device's opt-in limit is
//    smaller it falls back to the general path.
//  * general: each half-iteration is a cuBLAS GEMM (at::mm_out on the current stream, written straight into
//    the history buffer) followed by one fused elementwise kernel, exactly like the CPU implementation; w comes
//    from one more GEMM and is returned, the backward only computes u_T KC (and, without need_q, skips grad_q:
//    no buffer, no accumulation, no product for vbar_1).
// Index arithmetic on (T, B, C) histories is int64; grids are 1-D with at most B (checked <= INT32_MAX, CUDA's
// x-axis limit) or 2^20 blocks; every op runs under a CUDAGuard for its tensors' device on the current stream, and
// nothing waits for the device.
// Setting the environment variable CKAKD_SINKHORN_CUDA_GENERAL=1 forces the general path (tests, benchmarks).
//
// Only c10/cuda headers are used for streams, guards and error checks (c10::cuda::getCurrentCUDAStream is what
// at::cuda::getCurrentCUDAStream re-exports): ATen/cuda/CUDAContext.h pulls in the cuBLAS/cuSPARSE headers,
// which a CPU-only torch + bare nvcc setup lacks, and nothing here needs them (GEMMs go through at::mm_out).
// fp32 GEMMs follow torch's matmul precision setting (torch.backends.cuda.matmul.allow_tf32, default off).

#include "sinkhorn.h"

#include <tuple>

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

namespace ckakd {
namespace {

constexpr int kThreads = 256;         // elementwise / reduction kernels
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest
constexpr int kFusedMaxC = 128;       // largest C handled by the one-launch kernels

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid on thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A x) {
  __shared__ A partial[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  A total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += partial[w];
  }
  return total;
}

// ---------------------------------------------------------------------------------------------------------
// general path: elementwise kernels around cuBLAS GEMMs

// a <- a + delta;  out <- num / a
template <typename T>
__global__ void add_delta_divide_kernel(T* __restrict__ a, const T* __restrict__ num, T* __restrict__ out,
                                        int64_t n) {
  const T delta = static_cast<T>(kSinkhornDelta);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const T x = a[i] + delta;
    a[i] = x;
    out[i] = num[i] / x;
  }
}

// out[r] = sum_i x[r, i] * y[r, i]; one block per row
template <typename T>
__global__ void row_dot_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out, int64_t C) {
  using acc_t = at::acc_type<T, /*is_cuda=*/true>;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * C;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
    s += static_cast<acc_t>(x[base + i]) * static_cast<acc_t>(y[base + i]);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<T>(s);
}

// x[r, :] = g[r] * w[r, :];  y[r, :] *= g[r]  (y may be null: not needed)
template <typename T>
__global__ void scale_rows_kernel(const T* __restrict__ w, T* __restrict__ x, T* __restrict__ y,
                                  const T* __restrict__ g, int64_t n, int64_t C) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const T s = g[i / C];
    x[i] = s * w[i];
    if (y != nullptr) y[i] *= s;
  }
}

// r = bar / den;  grad (=|+=) r (grad may be null: that gradient is not needed);  tmp = -r * val
template <typename T>
__global__ void backward_step_kernel(const T* __restrict__ bar, const T* __restrict__ den, const T* __restrict__ val,
                                     T* __restrict__ grad, T* __restrict__ tmp, int64_t n, bool first) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const T r = bar[i] / den[i];
    if (grad != nullptr) grad[i] = first ? r : grad[i] + r;
    tmp[i] = -r * val[i];
  }
}

// ---------------------------------------------------------------------------------------------------------
// fused path: one block per sample, K (or KC) in shared memory with an odd row stride `ld`

// sum_i x[i] * M[i, j]  (column j; consecutive threads read consecutive j)
template <typename T>
__device__ __forceinline__ T col_dot(const T* __restrict__ x, const T* __restrict__ M, int ld, int j, int C) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int i = 0;
  for (; i + 4 <= C; i += 4) {
    s0 += x[i] * M[i * ld + j];
    s1 += x[i + 1] * M[(i + 1) * ld + j];
    s2 += x[i + 2] * M[(i + 2) * ld + j];
    s3 += x[i + 3] * M[(i + 3) * ld + j];
  }
  for (; i < C; ++i) s0 += x[i] * M[i * ld + j];
  return (s0 + s1) + (s2 + s3);
}

// sum_j M[i, j] * x[j]  (row i; the odd stride spreads consecutive i over distinct banks)
template <typename T>
__device__ __forceinline__ T row_dot(const T* __restrict__ M, const T* __restrict__ x, int ld, int i, int C) {
  const T* row = M + i * ld;
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int j = 0;
  for (; j + 4 <= C; j += 4) {
    s0 += row[j] * x[j];
    s1 += row[j + 1] * x[j + 1];
    s2 += row[j + 2] * x[j + 2];
    s3 += row[j + 3] * x[j + 3];
  }
  for (; j < C; ++j) s0 += row[j] * x[j];
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
__device__ __forceinline__ void load_matrix(T* __restrict__ dst, const T* __restrict__ src, int ld, int C) {
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    const int i = idx / C, j = idx - i * C;
    dst[i * ld + j] = src[idx];
  }
}

// Dynamic shared memory: M (C x ld) then two length-C vectors.
inline size_t fused_smem_bytes(int64_t C, size_t elem) {
  const int64_t ld = C | 1;
  return static_cast<size_t>(C * ld + 2 * C) * elem;
}

template <typename T>
__global__ void fused_forward_kernel(const T* __restrict__ p, const T* __restrict__ q, const T* __restrict__ K,
                                     const T* __restrict__ KC, const T* __restrict__ u0, T* __restrict__ cost,
                                     T* __restrict__ u_hist, T* __restrict__ v_hist, T* __restrict__ a_hist,
                                     T* __restrict__ b_hist, T* __restrict__ w, int64_t B, int C, int ld,
                                     int iters) {
  using acc_t = at::acc_type<T, /*is_cuda=*/true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sM = reinterpret_cast<T*>(smem_raw);
  T* su = sM + C * ld;
  T* sv = su + C;
  const T delta = static_cast<T>(kSinkhornDelta);
  const int tid = threadIdx.x;
  const bool active = tid < C;
  const int64_t BC = B * C;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * C + tid;  // this thread's element of sample b

  load_matrix(sM, K, ld, C);
  T pi = 0, qj = 0;
  if (active) {
    pi = p[row];
    qj = q[row];
    const T u = u0[row];
    su[tid] = u;
    u_hist[row] = u;
  }
  __syncthreads();
  for (int t = 0; t < iters; ++t) {
    const int64_t off = t * BC + row;
    if (active) {  // a_t[j] = sum_i u[i] K[i, j] + delta;  v_t[j] = q[j] / a_t[j]
      const T a = col_dot(su, sM, ld, tid, C) + delta;
      const T v = qj / a;
      a_hist[off] = a;
      v_hist[off] = v;
      sv[tid] = v;
    }
    __syncthreads();
    if (active) {  // b_t[i] = sum_j K[i, j] v[j] + delta;  u_t[i] = p[i] / b_t[i]
      const T b = row_dot(sM, sv, ld, tid, C) + delta;
      const T u = pi / b;
      b_hist[off] = b;
      u_hist[off + BC] = u;
      su[tid] = u;
    }
    __syncthreads();
  }
  // w[i] = sum_j KC[i, j] v[j];  cost = sum_i u[i] w[i]. KC replaces K in shared memory (all reads of K are done)
  load_matrix(sM, KC, ld, C);
  __syncthreads();
  acc_t s = 0;
  if (active) {
    const T wi = row_dot(sM, sv, ld, tid, C);
    w[row] = wi;
    s = static_cast<acc_t>(su[tid]) * static_cast<acc_t>(wi);
  }
  s = block_sum(s);
  if (tid == 0) cost[blockIdx.x] = static_cast<T>(s);
}

// need_q false: grad_q is not computed (nor written: it may be null), and the step at t = 1 stops after grad_p;
// with T = 1 that also skips vbar_T (and KC): only grad_p = g w / b_1 is left.
template <typename T>
__global__ void fused_backward_kernel(const T* __restrict__ grad_cost, const T* __restrict__ K,
                                      const T* __restrict__ KC, const T* __restrict__ u_hist,
                                      const T* __restrict__ v_hist, const T* __restrict__ a_hist,
                                      const T* __restrict__ b_hist, const T* __restrict__ w,
                                      T* __restrict__ grad_p, T* __restrict__ grad_q, int64_t B, int C, int ld,
                                      int iters, bool need_q) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sM = reinterpret_cast<T*>(smem_raw);
  T* sx = sM + C * ld;
  T* sy = sx + C;
  const int tid = threadIdx.x;
  const bool active = tid < C;
  const int64_t BC = B * C;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * C + tid;
  const T g = grad_cost[blockIdx.x];

  // ubar = g w (w = v_T KC^T from the forward), vbar_T = g (u_T KC) (only feeds grad_q when T = 1)
  const T ubar_T = active ? g * w[row] : T(0);
  if (iters == 1 && !need_q) {  // block-uniform: no barrier is skipped by part of the block
    if (active) grad_p[row] = ubar_T / b_hist[row];
    return;
  }
  load_matrix(sM, KC, ld, C);
  if (active) sx[tid] = u_hist[iters * BC + row];
  __syncthreads();
  T ubar = ubar_T, vbar_T = 0;
  if (active) vbar_T = g * col_dot(sx, sM, ld, tid, C);
  __syncthreads();
  load_matrix(sM, K, ld, C);
  __syncthreads();

  T gp = 0, gq = 0;
  for (int t = iters; t >= 1; --t) {
    const int64_t off = (t - 1) * BC + row;  // a_t, b_t, v_t; u_t is u_hist[t]
    if (active) {  // u_t = p / b_t
      const T r = ubar / b_hist[off];
      gp += r;
      sx[tid] = -r * u_hist[off + BC];  // bbar
    }
    if (t == 1 && !need_q) break;  // vbar_1 and abar_1 only feed grad_q (block-uniform)
    __syncthreads();
    if (active) {  // b_t = v_t K^T + delta:  vbar = [t == T] vbar_T + bbar K;  then v_t = q / a_t
      const T vbar = (t == iters ? vbar_T : T(0)) + col_dot(sx, sM, ld, tid, C);
      const T r = vbar / a_hist[off];
      if (need_q) gq += r;
      sy[tid] = -r * v_hist[off];  // abar
    }
    __syncthreads();
    // a_t = u_{t-1} K + delta:  ubar = abar K^T (u_0 is a constant). The next writes to sx happen after every
    // thread has passed the barrier above, and sy is next written after the following barrier.
    if (active && t > 1) ubar = row_dot(sM, sy, ld, tid, C);
  }
  if (active) {
    grad_p[row] = gp;
    if (need_q) grad_q[row] = gq;
  }
}

// ---------------------------------------------------------------------------------------------------------
// path selection

bool force_general_path() {
  const char* env = std::getenv("CKAKD_SINKHORN_CUDA_GENERAL");
  return env != nullptr && env[0] != '\0' && !(env[0] == '0' && env[1] == '\0');
}

// Bytes of dynamic shared memory for the fused kernels, or 0 when the general path must be used.
size_t fused_path_smem(int64_t C, size_t elem, int device) {
  if (C > kFusedMaxC || force_general_path()) return 0;
  const size_t bytes = fused_smem_bytes(C, elem);
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t static_bytes = 32 * sizeof(double);  // block_sum's partials
  return bytes + static_bytes <= static_cast<size_t>(optin) ? bytes : 0;
}

inline int fused_threads(int64_t C) { return static_cast<int>(std::max<int64_t>(32, (C + 31) / 32 * 32)); }

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

void check_cuda(const char* op, const at::Tensor& p) {
  TORCH_CHECK(p.is_cuda(), op, " (CUDA kernel): got tensors on ", p.device());
}

// ---------------------------------------------------------------------------------------------------------
// ops

SinkhornForwardResult sinkhorn_fixed_forward_cuda(const at::Tensor& p_, const at::Tensor& q_, const at::Tensor& K_,
                                                  const at::Tensor& KC_, const at::Tensor& u0_, int64_t iters) {
  const int64_t T = check_sinkhorn_forward_args(p_, q_, K_, KC_, u0_, iters);
  check_cuda("ckakd::sinkhorn_fixed_forward", p_);
  TORCH_CHECK(T <= INT32_MAX && p_.size(0) <= INT32_MAX, "ckakd::sinkhorn_fixed_forward: iters (", T,
              ") and the batch size (", p_.size(0), ") must fit in 32 bits");
  const c10::cuda::CUDAGuard device_guard(p_.device());
  const at::Tensor p = p_.contiguous(), q = q_.contiguous(), K = K_.contiguous(), KC = KC_.contiguous();
  const at::Tensor u0 = u0_.contiguous();
  const int64_t B = p.size(0), C = p.size(1), n = B * C;
  const auto opts = p.options();
  at::Tensor cost, u_hist, v_hist, a_hist, b_hist, w;
  std::tie(cost, u_hist, v_hist, a_hist, b_hist, w) = empty_forward_outputs(T, B, C, opts);
  if (n == 0) {
    cost.zero_();
    return {cost, u_hist, v_hist, a_hist, b_hist, w};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "sinkhorn_fixed_forward_cuda", [&] {
    const size_t smem = fused_path_smem(C, sizeof(scalar_t), p.get_device());
    if (smem > 0) {
      allow_dynamic_smem(fused_forward_kernel<scalar_t>, smem);
      fused_forward_kernel<scalar_t><<<static_cast<unsigned int>(B), fused_threads(C), smem, stream>>>(
          p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(), KC.data_ptr<scalar_t>(),
          u0.data_ptr<scalar_t>(), cost.data_ptr<scalar_t>(), u_hist.data_ptr<scalar_t>(),
          v_hist.data_ptr<scalar_t>(), a_hist.data_ptr<scalar_t>(), b_hist.data_ptr<scalar_t>(),
          w.data_ptr<scalar_t>(), B, static_cast<int>(C), static_cast<int>(C | 1), static_cast<int>(T));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    u_hist.select(0, 0).copy_(u0);
    const at::Tensor Kt = K.t();
    const unsigned int blocks = blocks_for(n);
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor u_prev = u_hist.select(0, t), u_next = u_hist.select(0, t + 1);
      at::Tensor a = a_hist.select(0, t), v = v_hist.select(0, t), b = b_hist.select(0, t);
      at::mm_out(a, u_prev, K);  // a_t = u_{t-1} K
      add_delta_divide_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mm_out(b, v, Kt);  // b_t = v_t K^T
      add_delta_divide_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          b.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), u_next.data_ptr<scalar_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::mm_out(w, v_hist.select(0, T - 1), KC.t());  // w = v_T KC^T (returned for the backward)
    row_dot_kernel<scalar_t><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
        u_hist.select(0, T).data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), cost.data_ptr<scalar_t>(), C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cost, u_hist, v_hist, a_hist, b_hist, w};
}

SinkhornBackwardResult sinkhorn_fixed_backward_cuda(const at::Tensor& grad_cost_, const at::Tensor& p_,
                                                    const at::Tensor& q_, const at::Tensor& K_,
                                                    const at::Tensor& KC_, const at::Tensor& u_hist_,
                                                    const at::Tensor& v_hist_, const at::Tensor& a_hist_,
                                                    const at::Tensor& b_hist_, const at::Tensor& w_,
                                                    bool need_q) {
  const int64_t T =
      check_sinkhorn_backward_args(grad_cost_, p_, q_, K_, KC_, u_hist_, v_hist_, a_hist_, b_hist_, w_);
  check_cuda("ckakd::sinkhorn_fixed_backward", p_);
  TORCH_CHECK(T <= INT32_MAX && p_.size(0) <= INT32_MAX, "ckakd::sinkhorn_fixed_backward: T (", T,
              ") and the batch size (", p_.size(0), ") must fit in 32 bits");
  const c10::cuda::CUDAGuard device_guard(p_.device());
  const at::Tensor g = grad_cost_.contiguous(), K = K_.contiguous(), KC = KC_.contiguous();
  const at::Tensor u_hist = u_hist_.contiguous(), v_hist = v_hist_.contiguous();
  const at::Tensor a_hist = a_hist_.contiguous(), b_hist = b_hist_.contiguous(), w = w_.contiguous();
  const int64_t B = p_.size(0), C = p_.size(1), n = B * C;
  const auto opts = p_.options();
  at::Tensor grad_p = at::empty({B, C}, opts);
  at::Tensor grad_q = need_q ? at::empty({B, C}, opts) : at::empty({0}, opts);  // the schema's (0,) without need_q
  if (n == 0) return {grad_p, grad_q};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p_.scalar_type(), "sinkhorn_fixed_backward_cuda", [&] {
    scalar_t* gqp = need_q ? grad_q.data_ptr<scalar_t>() : nullptr;
    const size_t smem = fused_path_smem(C, sizeof(scalar_t), p_.get_device());
    if (smem > 0) {
      allow_dynamic_smem(fused_backward_kernel<scalar_t>, smem);
      fused_backward_kernel<scalar_t><<<static_cast<unsigned int>(B), fused_threads(C), smem, stream>>>(
          g.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(), KC.data_ptr<scalar_t>(), u_hist.data_ptr<scalar_t>(),
          v_hist.data_ptr<scalar_t>(), a_hist.data_ptr<scalar_t>(), b_hist.data_ptr<scalar_t>(),
          w.data_ptr<scalar_t>(), grad_p.data_ptr<scalar_t>(), gqp, B, static_cast<int>(C),
          static_cast<int>(C | 1), static_cast<int>(T), need_q);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // ubar = g w (w = v_T KC^T from the forward), vbar = g (u_T KC) (without need_q and with T = 1, vbar only
    // feeds grad_q: skipped)
    at::Tensor ubar = at::empty({B, C}, opts);
    at::Tensor vbar = (need_q || T > 1) ? at::mm(u_hist.select(0, T), KC) : at::Tensor();
    at::Tensor tmp = at::empty({B, C}, opts);
    const unsigned int blocks = blocks_for(n);
    scale_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        w.data_ptr<scalar_t>(), ubar.data_ptr<scalar_t>(), vbar.defined() ? vbar.data_ptr<scalar_t>() : nullptr,
        g.data_ptr<scalar_t>(), n, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor Kt = K.t();
    for (int64_t t = T; t >= 1; --t) {
      const int64_t k = t - 1;
      backward_step_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          ubar.data_ptr<scalar_t>(), b_hist.select(0, k).data_ptr<scalar_t>(), u_hist.select(0, t).data_ptr<scalar_t>(),
          grad_p.data_ptr<scalar_t>(), tmp.data_ptr<scalar_t>(), n, t == T);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (t == 1 && !need_q) break;  // vbar_1 and abar_1 only feed grad_q
      if (t == T) {
        vbar.addmm_(tmp, K);
      } else {
        at::mm_out(vbar, tmp, K);
      }
      // grad_q (+)= vbar / a_t only with need_q; abar = -vbar v_t / a_t is needed either way (t > 1 here)
      backward_step_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          vbar.data_ptr<scalar_t>(), a_hist.select(0, k).data_ptr<scalar_t>(), v_hist.select(0, k).data_ptr<scalar_t>(),
          gqp, tmp.data_ptr<scalar_t>(), n, t == T);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (t > 1) at::mm_out(ubar, tmp, Kt);
    }
  });
  return {grad_p, grad_q};
}

}  // namespace
}  // namespace ckakd

TORCH_LIBRARY_IMPL(ckakd, CUDA, m) {
  m.impl("sinkhorn_fixed_forward", &ckakd::sinkhorn_fixed_forward_cuda);
  m.impl("sinkhorn_fixed_backward", &ckakd::sinkhorn_fixed_backward_cuda);
}
