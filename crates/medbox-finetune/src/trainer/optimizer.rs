//! AdamW (decoupled weight decay, as `torch.optim.AdamW`), global-norm
//! gradient clipping, and the learning-rate schedule: linear warm-up from 0,
//! then cosine decay to 0 (transformers' `get_cosine_schedule_with_warmup`).
//!
//! The optimizer state is plain tensors by parameter name, so a checkpoint
//! saves and restores it exactly.

use tch::{TchError, Tensor};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;

/// The learning rate of optimizer step `step` (1-based) of `total_steps`.
/// Step 1 uses the schedule at 0, as transformers' schedulers do.
pub fn learning_rate(peak: f64, warmup_ratio: f64, step: u64, total_steps: u64) -> f64 {
    let warmup = (warmup_ratio * total_steps as f64).ceil() as u64;
    let current = step.saturating_sub(1);
    if current < warmup {
        return peak * current as f64 / warmup.max(1) as f64;
    }
    let progress = (current - warmup) as f64 / total_steps.saturating_sub(warmup).max(1) as f64;
    peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

/// AdamW's running moments, one pair per parameter, in the parameters' order.
pub struct AdamW {
    pub weight_decay: f64,
    /// First moments (`exp_avg`).
    pub exp_avg: Vec<Tensor>,
    /// Second moments (`exp_avg_sq`).
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(parameters: &[(String, Tensor)], weight_decay: f64) -> Result<AdamW, TchError> {
        let zeros = |tensor: &Tensor| tensor.f_detach()?.f_zeros_like();
        Ok(AdamW {
            weight_decay,
            exp_avg: parameters
                .iter()
                .map(|(_, tensor)| zeros(tensor))
                .collect::<Result<_, _>>()?,
            exp_avg_sq: parameters
                .iter()
                .map(|(_, tensor)| zeros(tensor))
                .collect::<Result<_, _>>()?,
        })
    }

    /// One update of every parameter with a gradient, at optimizer step
    /// `step` (1-based, for the bias corrections).
    pub fn step(
        &mut self,
        parameters: &[(String, Tensor)],
        learning_rate: f64,
        step: u64,
    ) -> Result<(), TchError> {
        let _no_grad = tch::no_grad_guard();
        let bias_correction1 = 1.0 - BETA1.powi(step as i32);
        let bias_correction2 = 1.0 - BETA2.powi(step as i32);
        for (index, (_, parameter)) in parameters.iter().enumerate() {
            let gradient = parameter.f_grad()?;
            if !gradient.defined() {
                continue;
            }
            let exp_avg = &mut self.exp_avg[index];
            let _ = exp_avg
                .f_mul_scalar_(BETA1)?
                .f_add_(&gradient.f_mul_scalar(1.0 - BETA1)?)?;
            let exp_avg_sq = &mut self.exp_avg_sq[index];
            let _ = exp_avg_sq
                .f_mul_scalar_(BETA2)?
                .f_add_(&gradient.f_mul(&gradient)?.f_mul_scalar(1.0 - BETA2)?)?;
            let mut parameter = parameter.shallow_clone();
            if self.weight_decay > 0.0 {
                let _ = parameter.f_mul_scalar_(1.0 - learning_rate * self.weight_decay)?;
            }
            let denominator = exp_avg_sq
                .f_sqrt()?
                .f_div_scalar(bias_correction2.sqrt())?
                .f_add_scalar(EPSILON)?;
            let update = exp_avg
                .f_div(&denominator)?
                .f_mul_scalar(learning_rate / bias_correction1)?;
            let _ = parameter.f_sub_(&update)?;
        }
        Ok(())
    }
}

/// Scales every gradient so that their global L2 norm is at most
/// `max_norm` (as `torch.nn.utils.clip_grad_norm_`); returns the norm before.
pub fn clip_gradients(parameters: &[(String, Tensor)], max_norm: f64) -> Result<f64, TchError> {
    let _no_grad = tch::no_grad_guard();
    let mut norms = Vec::with_capacity(parameters.len());
    let mut gradients = Vec::with_capacity(parameters.len());
    for (_, parameter) in parameters {
        let gradient = parameter.f_grad()?;
        if gradient.defined() {
            norms.push(gradient.f_norm()?.f_to_kind(tch::Kind::Double)?);
            gradients.push(gradient);
        }
    }
    // One read back from the device for the whole model.
    let total = if norms.is_empty() {
        0.0
    } else {
        Tensor::f_stack(&norms, 0)?.f_norm()?.f_double_value(&[])?
    };
    let coefficient = max_norm / (total + 1e-6);
    if max_norm > 0.0 && coefficient < 1.0 {
        for mut gradient in gradients {
            let _ = gradient.f_mul_scalar_(coefficient)?;
        }
    }
    Ok(total)
}

/// Clears every gradient before the next step.
pub fn zero_gradients(parameters: &[(String, Tensor)]) -> Result<(), TchError> {
    for (_, parameter) in parameters {
        let mut gradient = parameter.f_grad()?;
        if gradient.defined() {
            let _ = gradient.f_detach_()?.f_zero_()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let check = |step: u64, expect: f64| {
            let lr = learning_rate(1.0, 0.1, step, 100);
            assert!((lr - expect).abs() < 1e-9, "step {step}: {lr} != {expect}");
        };
        check(1, 0.0);
        check(6, 0.5);
        check(11, 1.0);
        check(56, 0.5);
        check(101, 0.0);
        // No warm-up: the peak at once.
        assert_eq!(learning_rate(2e-4, 0.0, 1, 10), 2e-4);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_the_learning_rate() {
        // With bias correction the first Adam step is lr · sign(g).
        let mut weight = Tensor::from_slice(&[1.0f32, -1.0]);
        let _ = weight.requires_grad_(true);
        let parameters = vec![("w".to_owned(), weight.shallow_clone())];
        let loss = weight.f_mul_scalar(3.0).unwrap().sum(None);
        loss.backward();
        let norm = clip_gradients(&parameters, 1.0).unwrap();
        assert!((norm - 18f64.sqrt()).abs() < 1e-5);
        let mut optimizer = AdamW::new(&parameters, 0.0).unwrap();
        optimizer.step(&parameters, 0.1, 1).unwrap();
        let values = Vec::<f32>::try_from(weight.detach()).unwrap();
        assert!(
            (values[0] - 0.9).abs() < 1e-5 && (values[1] + 1.1).abs() < 1e-5,
            "{values:?}"
        );
        zero_gradients(&parameters).unwrap();
        let gradient = Vec::<f32>::try_from(weight.grad()).unwrap();
        assert_eq!(gradient, [0.0, 0.0]);
    }
}
