// One PGD step on a per-sample perturbation (SPEC 4.2), with the reference's non-finite policy: a sample
// whose gradient holds a NaN/Inf keeps its delta unchanged.
//
// L2:   v = delta + c_i * g, c_i = step_i / max(||g||, 1e-8) (or step_i without normalisation);
//       delta' = v * min(1, R_i / max(||v||, 1e-8)) with ||v||^2 = ||d||^2 + 2 c <d,g> + c^2 ||g||^2,
//       so one reading pass gives the three per-sample dot products and one pass writes delta'.
//       When a sample fits one chunk both passes run back to back on the same thread (cache-hot).
// Linf: delta' = clamp(delta + step_i * sign(g), -R_i, R_i) (g instead of sign(g) without
//       normalisation), one pass; samples found non-finite are copied back afterwards.
// With a model-input base x_t the same pass also writes x_t + delta' (delta' rounded first, as the
// reference does), so the next model input needs no extra pass.
#include "common.h"
#include "kernels.h"

namespace fastat_cpu {
namespace {

constexpr double kNormFloor = 1e-8;  // the official P1 code's max(||.||, 1e-8)

struct Dots {
  double gg = 0.0, dg = 0.0, dd = 0.0, nonfinite = 0.0;  // nonfinite: sum of g*0, NaN iff a g is NaN/Inf
  void add(const Dots& o) {
    gg += o.gg;
    dg += o.dg;
    dd += o.dd;
    nonfinite += o.nonfinite;
  }
};

template <typename scalar_t>
Dots dots(const scalar_t* pd, const scalar_t* pg, int64_t b, int64_t e) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t gg[kLanes] = {}, dg[kLanes] = {}, dd[kLanes] = {}, nf[kLanes] = {};
  int64_t k = b;
  for (; k + kLanes <= e; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = static_cast<acc_t>(pd[k + l]), g = static_cast<acc_t>(pg[k + l]);
      gg[l] += g * g;
      dg[l] += d * g;
      dd[l] += d * d;
      nf[l] += g * acc_t(0);
    }
  }
  for (int l = 0; k < e; ++k, ++l) {
    const acc_t d = static_cast<acc_t>(pd[k]), g = static_cast<acc_t>(pg[k]);
    gg[l] += g * g;
    dg[l] += d * g;
    dd[l] += d * d;
    nf[l] += g * acc_t(0);
  }
  return Dots{sum_lanes(gg), sum_lanes(dg), sum_lanes(dd), sum_lanes(nf)};
}

struct StepCoef {
  bool finite;
  double c, scale;  // delta' = (delta + c * g) * scale
};

StepCoef l2_coef(const Dots& s, double step, double radius, bool normalize) {
  if (std::isnan(s.nonfinite)) return StepCoef{false, 0.0, 1.0};
  const double c = normalize ? step / std::max(std::sqrt(s.gg), kNormFloor) : step;
  const double vv = std::max(0.0, s.dd + 2.0 * c * s.dg + c * c * s.gg);
  const double scale = std::min(1.0, radius / std::max(std::sqrt(vv), kNormFloor));
  return StepCoef{true, c, scale};
}

// Output pointers: delta' and, when base != nullptr, x' = base + delta'.
template <typename scalar_t>
struct Out {
  scalar_t* delta;
  const scalar_t* base;
  scalar_t* x;
};

template <typename scalar_t>
void add_base(const Out<scalar_t>& o, int64_t b, int64_t e) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = b; i < e; ++i)
    o.x[i] = static_cast<scalar_t>(static_cast<acc_t>(o.base[i]) + static_cast<acc_t>(o.delta[i]));
}

template <typename scalar_t>
void l2_write(const scalar_t* pd, const scalar_t* pg, const Out<scalar_t>& o, int64_t b, int64_t e,
              const StepCoef& k) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* po = o.delta;
  if (!k.finite) {
    std::copy(pd + b, pd + e, po + b);
  } else {
    const acc_t c = static_cast<acc_t>(k.c), scale = static_cast<acc_t>(k.scale);
    for (int64_t i = b; i < e; ++i)
      po[i] = static_cast<scalar_t>((static_cast<acc_t>(pd[i]) + c * static_cast<acc_t>(pg[i])) * scale);
  }
  if (o.base != nullptr) add_base(o, b, e);
}

template <typename scalar_t>
void pgd_l2(const scalar_t* pd, const scalar_t* pg, const Out<scalar_t>& po, const Split& split, const Coef& step,
            const Coef& radius, bool normalize) {
  if (split.chunks == 1) {
    at::parallel_for(0, split.batch, split.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i * split.numel, e = b + split.numel;
        const StepCoef k = l2_coef(dots(pd, pg, b, e), step[i], radius[i], normalize);
        l2_write(pd, pg, po, b, e, k);
      }
    });
    return;
  }
  std::vector<Dots> partial(split.items());
  at::parallel_for(0, split.items(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) partial[item] = dots(pd, pg, split.begin(item), split.end(item));
  });
  std::vector<StepCoef> coef(split.batch);
  for (int64_t i = 0; i < split.batch; ++i) {
    Dots s;
    for (int64_t c = 0; c < split.chunks; ++c) s.add(partial[i * split.chunks + c]);
    coef[i] = l2_coef(s, step[i], radius[i], normalize);
  }
  at::parallel_for(0, split.items(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item)
      l2_write(pd, pg, po, split.begin(item), split.end(item), coef[item / split.chunks]);
  });
}

template <typename scalar_t>
void pgd_linf(const scalar_t* pd, const scalar_t* pg, const Out<scalar_t>& out, const Split& split,
              const Coef& step, const Coef& radius, bool normalize) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* po = out.delta;
  std::vector<char> bad(split.items(), 0);
  at::parallel_for(0, split.items(), split.grain(), [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t sample = item / split.chunks, b = split.begin(item), e = split.end(item);
      const acc_t st = static_cast<acc_t>(step[sample]), r = static_cast<acc_t>(radius[sample]);
      acc_t nf[kLanes] = {};
      int64_t k = b;
      auto one = [&](int64_t i) {
        const acc_t g = static_cast<acc_t>(pg[i]);
        const acc_t dir = normalize ? static_cast<acc_t>((g > acc_t(0)) - (g < acc_t(0))) : g;
        const acc_t v = static_cast<acc_t>(pd[i]) + st * dir;
        po[i] = static_cast<scalar_t>(std::max(std::min(v, r), -r));
        return g * acc_t(0);
      };
      for (; k + kLanes <= e; k += kLanes)
        for (int l = 0; l < kLanes; ++l) nf[l] += one(k + l);
      for (int l = 0; k < e; ++k, ++l) nf[l] += one(k);
      bad[item] = std::isnan(sum_lanes(nf)) ? 1 : 0;
      if (out.base != nullptr) add_base(out, b, e);
    }
  });
  for (int64_t item = 0; item < split.items(); ++item) {
    if (!bad[item]) continue;
    const int64_t first = (item / split.chunks) * split.chunks;  // restore the whole sample
    for (int64_t c = first; c < first + split.chunks; ++c) {
      std::copy(pd + split.begin(c), pd + split.end(c), po + split.begin(c));
      if (out.base != nullptr) add_base(out, split.begin(c), split.end(c));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pgd_step(const at::Tensor& delta_in, const at::Tensor& grad_in,
                                            const c10::optional<at::Tensor>& step_t, double step,
                                            const c10::optional<at::Tensor>& radius_t, double radius, bool l2,
                                            bool normalize, const c10::optional<at::Tensor>& base_in) {
  at::Tensor delta = delta_in, grad = grad_in;
  at::Tensor base = base_in.has_value() ? *base_in : at::Tensor();
  TORCH_CHECK(delta.dim() >= 1, "fastat_cpu.pgd_step: delta needs a batch dimension");
  check_same_dtype(delta, grad, "delta", "grad");
  if (base.defined()) check_same_dtype(delta, base, "delta", "model_input_base");
  make_flat({&delta, &grad, &base});
  const int64_t batch = delta.size(0), numel = sample_numel(delta);
  const Coef st = make_coef(step_t, step, batch, "step_size"), r = make_coef(radius_t, radius, batch, "radius");
  at::Tensor out = at::empty_like(delta);
  at::Tensor x = base.defined() ? at::empty_like(base) : at::empty({0}, delta.options());
  const Split split = make_split(batch, numel);
  if (split.items() == 0) return {out, x};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "fastat_cpu_pgd_step", [&] {
    const scalar_t* pd = delta.const_data_ptr<scalar_t>();
    const scalar_t* pg = grad.const_data_ptr<scalar_t>();
    const Out<scalar_t> po{out.mutable_data_ptr<scalar_t>(),
                           base.defined() ? base.const_data_ptr<scalar_t>() : nullptr,
                           base.defined() ? x.mutable_data_ptr<scalar_t>() : nullptr};
    if (l2)
      pgd_l2(pd, pg, po, split, st, r, normalize);
    else
      pgd_linf(pd, pg, po, split, st, r, normalize);
  });
  return {out, x};
}

}  // namespace fastat_cpu
