//! Which kernel a reduced-precision linear layer uses, by the number of rows
//! it multiplies at once.
//!
//! On a CPU with native bf16 arithmetic (AVX-512 BF16, AMX) libtorch's bf16
//! matrix products are fast at every size. On one without (AVX2 only), its
//! bf16 matrix-*vector* product is still the fastest way to decode one
//! stream (it reads half the bytes of f32), but its bf16 matrix-*matrix*
//! product falls back to a slow generic kernel: a 512-token bf16 prefill ran
//! at a fifth of the f32 speed on such a machine. There, products of many
//! rows convert the weights to f32 for the call and use the f32 kernel.
//!
//! Where the cross-over lies depends on the machine, so it is measured once
//! at load on a layer of the model's own shape; the result is logged.

use std::time::{Duration, Instant};

use tch::{Kind, TchError, Tensor};

/// Row counts tried, in order; the first at which f32 wins sets the policy.
const CANDIDATE_ROWS: [i64; 6] = [2, 4, 8, 16, 32, 64];
/// f32 must beat the native kernel by this factor to be chosen, so that
/// timing noise does not flip a near tie.
const MARGIN: f64 = 0.85;
/// Timed repetitions per kernel and size (the best one counts).
const REPETITIONS: usize = 3;

/// From how many rows a bf16/f16 linear layer computes in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MatmulPolicy {
    upcast_from_rows: i64,
}

impl MatmulPolicy {
    /// Always the native kernel of the weights' dtype.
    pub(crate) const NATIVE: MatmulPolicy = MatmulPolicy {
        upcast_from_rows: i64::MAX,
    };

    /// Measures, for weights of `kind` shaped (`out_features`, `in_features`)
    /// on `device`, from how many rows the f32 kernel (weights converted for
    /// the call) beats the native one. Only bf16 and f16 on the CPU are
    /// measured; everything else keeps [`MatmulPolicy::NATIVE`].
    pub(crate) fn calibrate(
        kind: Kind,
        device: tch::Device,
        in_features: usize,
        out_features: usize,
    ) -> Result<MatmulPolicy, TchError> {
        if device != tch::Device::Cpu || !matches!(kind, Kind::BFloat16 | Kind::Half) {
            return Ok(MatmulPolicy::NATIVE);
        }
        let _guard = tch::no_grad_guard();
        let options = (kind, device);
        let weight = Tensor::f_randn([out_features as i64, in_features as i64], options)?
            .f_div_scalar((in_features as f64).sqrt())?;
        for rows in CANDIDATE_ROWS {
            let xs = Tensor::f_randn([rows, in_features as i64], options)?;
            let native = fastest(|| xs.f_linear(&weight, None::<Tensor>).map(drop))?;
            let upcast = fastest(|| upcast_linear(&xs, &weight, None).map(drop))?;
            if upcast.as_secs_f64() < MARGIN * native.as_secs_f64() {
                tracing::info!(
                    ?kind,
                    rows,
                    native_us = native.as_micros() as u64,
                    f32_us = upcast.as_micros() as u64,
                    "matrix products of this many rows or more run in f32 on this CPU"
                );
                return Ok(MatmulPolicy {
                    upcast_from_rows: rows,
                });
            }
        }
        tracing::info!(
            ?kind,
            "the native kernel is the fastest at every batch size"
        );
        Ok(MatmulPolicy::NATIVE)
    }

    /// Whether a product of `rows` rows runs in f32.
    pub(crate) fn upcasts(self, rows: i64) -> bool {
        rows >= self.upcast_from_rows
    }
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
    fn only_reduced_precision_on_the_cpu_is_calibrated() {
        for kind in [Kind::Float, Kind::Double] {
            let policy = MatmulPolicy::calibrate(kind, tch::Device::Cpu, 8, 8).unwrap();
            assert_eq!(policy, MatmulPolicy::NATIVE);
        }
        assert!(!MatmulPolicy::NATIVE.upcasts(1 << 40));
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
