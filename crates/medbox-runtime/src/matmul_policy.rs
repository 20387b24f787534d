//! Which kernel a linear layer uses, by the number of rows it multiplies
//! at once.
//!
//! - A decode step multiplies few rows (one per running sequence) and reads
//!   every weight from memory: there `matvec`'s products are the fastest on
//!   an x86-64 CPU with AVX2 (1.5× to 8× libtorch on the bench model, by
//!   dtype; libtorch's int8 weight-only kernel is slower than f32 on such a
//!   CPU).
//! - On a CPU without native bf16 arithmetic (AVX2 only), libtorch's bf16
//!   matrix-*matrix* product falls back to a slow generic kernel: a 512-token
//!   bf16 prefill ran at a fifth of the f32 speed on such a machine. There,
//!   products of many rows convert the weights to f32 for the call and use
//!   the f32 kernel. int8 weights are converted likewise.
//!
//! Where the cross-overs lie depends on the machine, so they are measured
//! once at load on a layer of the model's own shape; the result is logged.

use std::time::{Duration, Instant};

use tch::{Kind, TchError, Tensor};

use crate::matvec;

/// Row counts tried, in order; the first at which f32 wins sets the
/// upcast policy.
const UPCAST_CANDIDATE_ROWS: [i64; 6] = [2, 4, 8, 16, 32, 64];
/// Up to this many rows `matvec` is used without measuring: it reads each
/// weight once for all of them, where libtorch's kernels read them once per
/// row or run at a fraction of the bandwidth.
const MATVEC_ALWAYS_ROWS: i64 = 4;
/// Larger row counts at which `matvec` is measured against libtorch; the
/// first one it loses sets its limit.
const MATVEC_CANDIDATE_ROWS: [i64; 4] = [8, 16, 32, 64];
/// A kernel must beat the other by this factor to be chosen, so that timing
/// noise does not flip a near tie.
const MARGIN: f64 = 0.85;
/// Timed repetitions per kernel and size (the best one counts).
const REPETITIONS: usize = 3;

/// The kernel choice of a model's linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MatmulPolicy {
    /// Up to how many rows `matvec` computes the product (0: never).
    matvec_up_to_rows: i64,
    /// From how many rows a bf16/f16 product computes in f32.
    upcast_from_rows: i64,
}

/// How a model's kernels are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelChoice {
    /// The fastest on this machine, measured at load ([`MatmulPolicy::calibrate`]).
    Measured,
    /// Always libtorch in the weights' dtype ([`MatmulPolicy::NATIVE`]), so
    /// that the same inputs give the same bits in every process: training,
    /// whose resumed runs repeat the uninterrupted losses exactly, uses it.
    /// A measured policy can differ between two loads by timing noise.
    Reproducible,
}

/// What computes one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `matvec::linear`, in f32 from the stored weights.
    Matvec,
    /// libtorch, with reduced-precision weights converted to f32 for the call.
    Upcast,
    /// libtorch in the weights' own dtype (int8: its weight-only kernel).
    Native,
}

impl MatmulPolicy {
    /// Always libtorch in the weights' dtype.
    pub(crate) const NATIVE: MatmulPolicy = MatmulPolicy {
        matvec_up_to_rows: 0,
        upcast_from_rows: i64::MAX,
    };

    /// Measures the policy for weights stored as `weight_kind` (`Int8` for
    /// weight-only int8) shaped (`out_features`, `in_features`), multiplied
    /// by activations of `kind` on `device`. Only the CPU is measured;
    /// elsewhere the policy is [`MatmulPolicy::NATIVE`].
    pub(crate) fn calibrate(
        weight_kind: Kind,
        kind: Kind,
        device: tch::Device,
        in_features: usize,
        out_features: usize,
    ) -> Result<MatmulPolicy, TchError> {
        if device != tch::Device::Cpu {
            return Ok(MatmulPolicy::NATIVE);
        }
        let _guard = tch::no_grad_guard();
        let dense = Tensor::f_randn(
            [out_features as i64, in_features as i64],
            (Kind::Float, device),
        )?
        .f_div_scalar((in_features as f64).sqrt())?;
        let (weight, scales) = if weight_kind == Kind::Int8 {
            let (values, scales) = quantize_rows(&dense)?;
            (values, Some(scales))
        } else {
            (dense.f_to_kind(weight_kind)?, None)
        };
        let mut policy = MatmulPolicy::NATIVE;
        if matches!(weight_kind, Kind::BFloat16 | Kind::Half) {
            policy.upcast_from_rows = upcast_cross_over(&weight, in_features)?;
        }
        if matvec::accelerated() && matvec::supports(weight_kind) {
            policy.matvec_up_to_rows = MATVEC_ALWAYS_ROWS;
            for rows in MATVEC_CANDIDATE_ROWS {
                let xs = Tensor::f_randn([rows, in_features as i64], (kind, device))?;
                let ours = fastest(|| matvec::linear(&xs, &weight, scales.as_ref()).map(drop))?;
                let theirs = fastest(|| {
                    policy
                        .libtorch(&xs, &weight, scales.as_ref(), None, rows)
                        .map(drop)
                })?;
                if ours.as_secs_f64() >= theirs.as_secs_f64() / MARGIN {
                    break;
                }
                policy.matvec_up_to_rows = rows;
            }
        }
        tracing::info!(
            ?weight_kind,
            matvec_up_to_rows = policy.matvec_up_to_rows,
            upcast_from_rows =
                (policy.upcast_from_rows != i64::MAX).then_some(policy.upcast_from_rows),
            "linear-layer kernels chosen for this CPU"
        );
        Ok(policy)
    }

    /// The kernel for a product of `rows` rows.
    pub(crate) fn kernel(self, rows: i64) -> Kernel {
        if rows <= self.matvec_up_to_rows {
            Kernel::Matvec
        } else if rows >= self.upcast_from_rows {
            Kernel::Upcast
        } else {
            Kernel::Native
        }
    }

    /// The product through libtorch, as this policy chooses for `rows`
    /// rows (never `matvec`).
    pub(crate) fn libtorch(
        self,
        xs: &Tensor,
        weight: &Tensor,
        scales: Option<&Tensor>,
        bias: Option<&Tensor>,
        rows: i64,
    ) -> Result<Tensor, TchError> {
        let Some(scales) = scales else {
            return if rows >= self.upcast_from_rows {
                upcast_linear(xs, weight, bias)
            } else {
                xs.f_linear(weight, bias)
            };
        };
        // libtorch's int8 kernel is a matrix-vector product: its cost grows
        // with the rows, so a prefill chunk or a big batch dequantizes the
        // weights once and multiplies densely.
        let kind = xs.f_kind()?;
        let out = if rows <= INT8_KERNEL_MAX_ROWS {
            xs.f_contiguous()?
                .f_internal_weight_int8pack_mm(weight, scales)?
        } else {
            let dense = weight
                .f_to_kind(kind)?
                .f_mul(&scales.f_unsqueeze(1)?.f_to_kind(kind)?)?;
            xs.f_linear(&dense, None::<Tensor>)?
        };
        match bias {
            Some(bias) => out.f_add(bias),
            None => Ok(out),
        }
    }
}

/// Rows (tokens in one step) up to which libtorch's int8 kernel is used.
const INT8_KERNEL_MAX_ROWS: i64 = 4;

/// Symmetric per-output-channel int8 of an f32 weight: each row's scale
/// maps its largest magnitude to 127. Returns the int8 values and the f32
/// scales (`w ≈ q · scale`).
pub(crate) fn quantize_rows(weight: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let weight = weight.f_to_kind(Kind::Float)?;
    let scales = weight
        .f_abs()?
        .f_amax([1i64].as_slice(), false)?
        .f_clamp_min(1e-12)?
        .f_div_scalar(127.0)?;
    let quantized = weight
        .f_div(&scales.f_unsqueeze(1)?)?
        .f_round()?
        .f_clamp(-127.0, 127.0)?
        .f_to_kind(Kind::Int8)?
        .f_contiguous()?;
    Ok((quantized, scales))
}

/// From how many rows the f32 kernel (weights converted per call) beats
/// libtorch's native reduced-precision one.
fn upcast_cross_over(weight: &Tensor, in_features: usize) -> Result<i64, TchError> {
    let options = (weight.f_kind()?, weight.device());
    for rows in UPCAST_CANDIDATE_ROWS {
        let xs = Tensor::f_randn([rows, in_features as i64], options)?;
        let native = fastest(|| xs.f_linear(weight, None::<Tensor>).map(drop))?;
        let upcast = fastest(|| upcast_linear(&xs, weight, None).map(drop))?;
        if upcast.as_secs_f64() < MARGIN * native.as_secs_f64() {
            return Ok(rows);
        }
    }
    Ok(i64::MAX)
}

/// `xs · weightᵀ + bias` computed in f32 and returned in `xs`'s kind.
pub(crate) fn upcast_linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor, TchError> {
    let bias = bias.map(|bias| bias.f_to_kind(Kind::Float)).transpose()?;
    xs.f_to_kind(Kind::Float)?
        .f_linear(&weight.f_to_kind(Kind::Float)?, bias.as_ref())?
        .f_to_kind(xs.f_kind()?)
}

/// The best of [`REPETITIONS`] timed runs after one warm-up.
fn fastest(mut run: impl FnMut() -> Result<(), TchError>) -> Result<Duration, TchError> {
    run()?;
    let mut best = Duration::MAX;
    for _ in 0..REPETITIONS {
        let started = Instant::now();
        run()?;
        best = best.min(started.elapsed());
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_rows_use_matvec_and_only_reduced_precision_upcasts() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Int8] {
            let activations = if kind == Kind::Int8 {
                Kind::Float
            } else {
                kind
            };
            let policy =
                MatmulPolicy::calibrate(kind, activations, tch::Device::Cpu, 64, 64).unwrap();
            let expected = if matvec::accelerated() {
                Kernel::Matvec
            } else {
                Kernel::Native
            };
            assert_eq!(policy.kernel(1), expected, "{kind:?}");
            assert_eq!(policy.kernel(MATVEC_ALWAYS_ROWS), expected, "{kind:?}");
            if kind != Kind::BFloat16 {
                assert_ne!(policy.kernel(1 << 40), Kernel::Upcast, "{kind:?}");
            }
        }
        let double = MatmulPolicy::calibrate(Kind::Double, Kind::Double, tch::Device::Cpu, 8, 8);
        assert_eq!(double.unwrap(), MatmulPolicy::NATIVE);
        assert_eq!(MatmulPolicy::NATIVE.kernel(1), Kernel::Native);
        assert_eq!(MatmulPolicy::NATIVE.kernel(1 << 40), Kernel::Native);
    }

    #[test]
    fn the_f32_path_computes_the_same_product() {
        let xs = Tensor::randn([5, 16], (Kind::BFloat16, tch::Device::Cpu));
        let weight = Tensor::randn([8, 16], (Kind::BFloat16, tch::Device::Cpu));
        let bias = Tensor::randn([8], (Kind::BFloat16, tch::Device::Cpu));
        let native = xs.linear(&weight, Some(&bias)).to_kind(Kind::Float);
        let upcast = upcast_linear(&xs, &weight, Some(&bias)).unwrap();
        assert_eq!(upcast.kind(), Kind::BFloat16);
        let difference = (native - upcast.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        // bf16 keeps 8 bits of mantissa; sums of 16 products of ~1 differ
        // only by rounding.
        assert!(difference < 0.25, "{difference}");
    }
}
