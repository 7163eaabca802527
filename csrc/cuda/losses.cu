// Fused per-sample losses (SPEC 4.3). Every loss here is a function of one residual
//     r = a - b - c / k_b          (c optional, k_b a per-sample divisor; b may be seeded noise regenerated
//                                   in-kernel from (seed, offset), see philox.cuh, so it is never stored)
//   P1 equivariant MSE:   a = pred, b = noise, c = delta, k = sigma        (target = noise + delta/sigma)
//   P2 regulariser:       a = pred_perturbed, b = pred_clean, c = omega, k = 1 (invariant: no c)
//   CM distance:          a = pred, b = target, no c
// metric 0: loss_b = sum(r^2) / D;  1: sum(|r|) / D;  2 (pseudo-Huber): sqrt(sum(r^2) + c^2) - c.
// Forward: one tile-reduction pass (per-warp partials, fixed-order finalize: deterministic) that can also store
// r in the input dtype, so the backward never re-reads a, b and c nor materialises the target:
//   dL/da = f_b(r),  dL/db = -f_b(r),  dL/dc = -f_b(r) / k_b   with f_b(r) = g_b * {2r/D, sign(r)/D, r/(loss_b + c)}.
#include "common.cuh"
#include "losses_ops.cuh"
#include "ops.h"
#include "philox.cuh"

namespace fastat {
namespace {

template <typename T, bool HAS_C>
void launch_residual(const Tiling& t, bool vec, bool save, bool abs_metric, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& c, at::Tensor& residual, const Coef<acc_t<T>>& k, bool seeded, uint64_t seed,
                     uint64_t offset, acc_t<T>* partials, cudaStream_t stream) {
  constexpr int P = pack_size<T>();
  const T* bp = seeded ? nullptr : b.data_ptr<T>();
  const T* cp = HAS_C ? c.data_ptr<T>() : nullptr;
  T* rp = save ? residual.data_ptr<T>() : nullptr;
  launch_tile_reduce<P, 1>(t, vec, ResidualOp<T, HAS_C>{a.data_ptr<T>(), bp, cp, rp, k, abs_metric, seeded, seed, offset}, partials, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> residual_loss_cuda(const at::Tensor& a_in, const c10::optional<at::Tensor>& b_in,
                                                      const c10::optional<at::Tensor>& c_in, const c10::optional<at::Tensor>& k,
                                                      double k_s, int64_t metric, double huber_c, bool save_residual, int64_t seed,
                                                      int64_t offset) {
  check_data(a_in, "a");
  const bool seeded = seed >= 0;
  TORCH_CHECK(seeded || (b_in.has_value() && b_in->defined()), "fastat_cuda: b is None and no seed (>= 0) was given");
  TORCH_CHECK(offset >= 0, "fastat_cuda: offset must be >= 0, got ", offset);
  at::Tensor b_t = seeded ? at::Tensor() : *b_in;
  if (!seeded) check_same(b_t, a_in, "b", "a");
  const bool has_c = c_in.has_value() && c_in->defined();
  if (has_c) check_same(*c_in, a_in, "c", "a");
  check_coef(k, a_in, "k");
  TORCH_CHECK(metric >= 0 && metric <= 2, "fastat_cuda: metric must be 0 (l2), 1 (l1) or 2 (pseudo_huber), got ", metric);
  c10::cuda::CUDAGuard guard(a_in.device());
  at::Tensor c_t = has_c ? *c_in : at::Tensor();
  // Seeded noise is indexed by the logical (row-major) index: that form runs on contiguous tensors.
  const bool keep = !seeded && shares_batch_major_layout({&a_in, &b_t, &c_t});
  at::Tensor a = batch_major(a_in, keep), b = batch_major(b_t, keep);
  c_t = batch_major(c_t, keep);
  const bool fp64 = a.scalar_type() == at::kDouble;
  const int64_t batch = a.size(0), d = per_sample_numel(a);
  at::Tensor loss = at::empty({batch}, a.options().dtype(fp64 ? at::kDouble : at::kFloat));
  at::Tensor residual = save_residual ? at::empty_like(a) : at::empty({0}, a.options());
  const bool vec = aligned16({&a, &b, &c_t, save_residual ? &residual : nullptr});
  const uint64_t sd = static_cast<uint64_t>(seeded ? seed : 0), off = static_cast<uint64_t>(offset);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  FASTAT_DISPATCH(a.scalar_type(), "fastat_cuda::residual_loss", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    constexpr int P = pack_size<T>();
    const Tiling t = make_tiling(batch, d, vec ? P : 1);
    at::Tensor partials = partials_buffer(t, 1, a, fp64);
    A* pp = partials.data_ptr<A>();
    const Coef<A> ck = make_coef<A>(k, k_s);
    if (has_c) {
      launch_residual<T, true>(t, vec, save_residual, metric == 1, a, b, c_t, residual, ck, seeded, sd, off, pp, stream);
    } else {
      launch_residual<T, false>(t, vec, save_residual, metric == 1, a, b, c_t, residual, ck, seeded, sd, off, pp, stream);
    }
    launch_finalize<1>(t, pp, LossFin<A>{static_cast<int>(metric), d, static_cast<A>(huber_c), loss.data_ptr<A>()}, stream);
  });
  return {loss, residual};
}

std::vector<at::Tensor> residual_loss_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& residual,
                                                    const at::Tensor& loss_in, const c10::optional<at::Tensor>& k, double k_s,
                                                    int64_t metric, double huber_c, bool need_a, bool need_b, bool need_c) {
  check_data(residual, "residual");
  check_coef(k, residual, "k");
  TORCH_CHECK(metric >= 0 && metric <= 2, "fastat_cuda: metric must be 0, 1 or 2, got ", metric);
  const at::ScalarType acc = residual.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_loss_in.numel() == residual.size(0) && loss_in.numel() == residual.size(0),
              "fastat_cuda: grad_loss and loss must have one value per sample");
  c10::cuda::CUDAGuard guard(residual.device());
  // The loss output of residual_loss is dense [B]; an upstream gradient may be expanded (stride 0): make it dense.
  at::Tensor grad_loss = grad_loss_in.reshape({-1}).to(acc).contiguous();
  at::Tensor loss = loss_in.reshape({-1}).to(acc).contiguous();
  std::vector<at::Tensor> outs;
  at::Tensor ga = need_a ? at::empty_like(residual) : at::Tensor();
  at::Tensor gb = need_b ? at::empty_like(residual) : at::Tensor();
  at::Tensor gc = need_c ? at::empty_like(residual) : at::Tensor();
  const bool vec = aligned16({&residual, &ga, &gb, &gc});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = residual.numel(), d = per_sample_numel(residual);

  if (need_a || need_b || need_c) {
    FASTAT_DISPATCH(residual.scalar_type(), "fastat_cuda::residual_loss_backward", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      constexpr int P = pack_size<T>();
      T* pa = need_a ? ga.data_ptr<T>() : nullptr;
      T* pb = need_b ? gb.data_ptr<T>() : nullptr;
      T* pc = need_c ? gc.data_ptr<T>() : nullptr;
      const Coef<A> ck = make_coef<A>(k, k_s);
      const A hc = static_cast<A>(huber_c);
      const A* gl = grad_loss.data_ptr<A>();
      const A* ls = loss.data_ptr<A>();
      launch_elementwise<P>(n, vec, ResidualGradOp<T>{residual.data_ptr<T>(), gl, ls, pa, pb, pc, ck, hc, static_cast<int>(metric), d},
                            stream);
    });
  }
  if (need_a) outs.push_back(ga);
  if (need_b) outs.push_back(gb);
  if (need_c) outs.push_back(gc);
  return outs;
}

}  // namespace fastat
